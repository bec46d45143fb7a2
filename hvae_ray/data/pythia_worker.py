"""A jet-generation worker process: ``python -m hvae_ray.data.pythia_worker``.

:func:`hvae_ray.data.generate.generate_jets` starts one per core. Started this way, a worker imports
only this package, never the parent's ``__main__``: generation is safe from a script without an
``if __name__ == "__main__":`` guard. (multiprocessing's ``spawn`` and ``forkserver`` children both
re-run the parent's main script before their first task; ``fork`` is unsafe once torch or Ray threads
exist.)

Protocol: the parent writes one task per line on stdin, a JSON list ``[flavor, seed, chunk, n]``; end
of input ends the worker. For each task the worker writes, on the stdout it was started with, a JSON
header line ``{"chunk": c, "n": n}`` followed by the raw bytes of the chunk's particles (n, 30, 3)
float32, mask (n, 30) bool and jets (n, 4) float32, or ``{"chunk": c, "error": "..."}``. File
descriptor 1 itself is sent to /dev/null, so that Pythia's and FastJet's C++ output cannot corrupt
the stream.
"""

from __future__ import annotations

import json
import os
import sys


def serve(tasks, out) -> None:
    """Answer every task line of ``tasks`` on the binary stream ``out``."""
    import numpy as np

    from hvae_ray.data.generate import _generate_chunk

    for line in tasks:
        if not line.strip():
            continue
        flavor, seed, chunk, n = json.loads(line)
        try:
            _, particles, mask, jets = _generate_chunk((flavor, int(seed), int(chunk), int(n)))
        except Exception as exc:  # reported to the parent, which raises it
            out.write(json.dumps({"chunk": chunk, "error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
            out.flush()
            continue
        out.write(json.dumps({"chunk": chunk, "n": int(n)}).encode() + b"\n")
        for arr, dtype in ((particles, np.float32), (mask, np.bool_), (jets, np.float32)):
            out.write(np.ascontiguousarray(arr, dtype=dtype).tobytes())
        out.flush()


def main() -> int:
    out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = sys.stderr
    try:
        serve(sys.stdin, out)
    except KeyboardInterrupt:  # Ctrl+C reaches the whole process group; the parent reports it
        return 130
    except BrokenPipeError:  # the parent is gone
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
