"""The theory lab: gradient leakage in one softmax self-attention layer with a squared loss.

Modules: `attention` (the victim), `share` (the client's clipped, noisy gradient and its epsilon),
`recover` (DLG on the layer, error modulo symmetries), `convergence` (the attack against the
gradient-descent bound), `identifiability` (the Jacobian of the shared gradient), `sweep` and `plots`
(`gradleak theory sweep`), `cli` (`gradleak theory ...`). Kept import-light: import the modules.
"""
