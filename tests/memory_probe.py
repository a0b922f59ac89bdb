"""Peak anonymous memory of a child process, for the bounded-memory tests of writes and imports.

The child runs ``measure(fn)``: ``RssAnon`` (heap and anonymous maps, not the page cache of memory-mapped
files, which the kernel reclaims) is sampled every 2 ms in a thread while ``fn`` runs, and the growth
over the starting value is printed in MB on the last line.
"""

PRELUDE = """
import threading, time

def _anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no RssAnon in /proc/self/status")

def measure(fn):
    start = _anon_mb()
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_mb())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    print(peak[0] - start)
"""
