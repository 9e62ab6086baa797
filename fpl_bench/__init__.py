import os

# Before torch loads OpenMP: idle intra-op threads sleep instead of spinning, so a second thread
# that meets another busy process costs ~1.1x instead of ~27x (fpl_bench/compute.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
