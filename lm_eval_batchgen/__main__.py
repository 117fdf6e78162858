from lm_eval_batchgen.cli import main

main()
