"""Constrained (guided) decoding: JSON Schema, regex, choice and EBNF grammar constraints, per request.

A constrained sample's next token is drawn among those its grammar allows: the model's logits of
the constrained rows are masked (-inf outside an xgrammar token bitmask) on the device just
before sampling, with the reference sampler. Unconstrained requests in the same step are sampled
as without constraints, and an engine with no constrained request in flight does no guided work.

The overlap with the async loop. A constrained row's mask for step N+1 depends on the token it
samples in step N, which the CPU sees only when step N's outputs arrive. So a step with
constrained rows is launched in two parts: its forward pass is enqueued as soon as its inputs are
built (the token of step N carried over on the device, as for every row), then the loop waits
for step N's tokens as always, advances the matchers with them (one call into the library) and
hands the fill of step N+1's masks to the decoder's thread, which fills them (the library releases
the GIL) while the GPU runs step N+1's forward and the loop processes step N's outputs and
prepares step N+2. Step N+1's sampling is enqueued with the masks (``ModelRunner.launch(...,
deferred=True)`` then ``ModelRunner.sample``) right before step N+2's forward. No row skips a step;
what the mask costs is the fill's time beyond the loop's own work, hidden behind the forward pass
as long as it is shorter. The tokens a constraint may not use are folded into its compiled
grammar, so a mask needs no work after the fill. The sync loop runs the same two parts (the fill
inline), so sync and async sample the same tokens.

Modules: ``compiler`` (constraints -> compiled grammars, cached; the tokens a constraint may use),
``decoder`` (a matcher per sample, the masks of a step).
"""
