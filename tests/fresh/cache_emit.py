"""Emit (or reuse) a package through the partition cache; used by the cache tests in separate processes.

Usage: cache_emit.py MODEL [--slow-writes]  (--slow-writes sleeps after each file, so a test can kill it mid-write)
Prints a JSON object: {"hit": bool, "path": str}.
"""

import json
import sys
import time
from pathlib import Path

from seqgen.cache import PartitionCache
from seqgen.emitter import EmitOptions
from seqgen.models import meta_model

if "--slow-writes" in sys.argv:
    write_text = Path.write_text

    def slow_write_text(self: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        written = write_text(self, *args, **kwargs)
        print("wrote", self, flush=True)
        time.sleep(0.5)
        return written

    Path.write_text = slow_write_text

package, hit = PartitionCache().get_or_emit(meta_model(sys.argv[1]), EmitOptions())
print(json.dumps({"hit": hit, "path": str(package.path)}))
