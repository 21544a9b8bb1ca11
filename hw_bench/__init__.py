"""Hardware benchmarks: LoadGen-style scenarios over bundles, locally and across the fleet.

The runner core (`loadgen`, `envinfo`, `bench`, `job`) is torch-free: device
agents import it. The PyTorch baseline, model building and plotting live in
cloud-side modules that import their heavy libraries inside functions.
"""

RESULTS_SCHEMA_VERSION = 1
