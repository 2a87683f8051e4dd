"""The C ABI of NeuroScale (include/neuroscale.h, libneuroscale.so).

:mod:`~neuroscale_couple.capi.session` holds what a C handle stands for (a Coupler, its
microstructure table, checkpoints), :mod:`~neuroscale_couple.capi.entry` the functions the
library calls, :mod:`~neuroscale_couple.capi.build` builds the library (``make capi``).
"""
