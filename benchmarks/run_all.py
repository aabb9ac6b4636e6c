"""Run every benchmark, one after another (about 3 hours on 2 CPUs, 2 of them P6's quality.py); each rewrites
its own section of docs/benchmarks.md."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["cache_io.py", "memory.py", "ray_overhead.py", "depth_and_cache.py", "phase_reuse.py", "quality.py",
           "corpus_scale.py"]

if __name__ == "__main__":
    for script in sys.argv[1:] or SCRIPTS:
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, script)], check=True)
