"""Equivalence transforms applied before quantization: each leaves the full-precision model's
function unchanged (to floating-point rounding) and changes what the solvers see.

* :mod:`.hadamard`: Hadamard matrices and seeded random rotations (pure math);
* :mod:`.rotation`: ``--transform hadamard``, a rotation of the residual stream (R1) and of each
  attention head's values (R2), merged into the weights as they are read;
* :mod:`.awq`: ``--transform awq``, activation-aware per-channel scales searched block by block
  on the calibration data and folded into the preceding norm or linear.
"""
