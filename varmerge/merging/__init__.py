"""Merging rules behind one registry (the public entry point is :mod:`varmerge.merge`).

* :mod:`~varmerge.merging.registry`: the :class:`~varmerge.merging.registry.MergeMethod` specs
  (posterior view, θ0 / calibration needs, options model) and the generic dispatcher ``apply``;
* :mod:`~varmerge.merging.kernels`: the chunked-merge machinery the rules share;
* :mod:`~varmerge.merging.gaussian`: simple, task arithmetic, Hessian-weighted (diagonal and
  full), mixture-weighted;
* :mod:`~varmerge.merging.baselines`: TIES, DARE, SLERP, model soup, RegMean, ESM;
* :mod:`~varmerge.merging.estimators`: the MAP front estimator's registration.

Importing this package loads nothing: the registry loads its rule modules on the first lookup.
"""
