"""pyserve: the Python incident demo's hot path as a benchmark workload. serve_request runs for
SECONDS, and the number of requests served is printed at the end: the throughput a profiler
leaves to the process it watches.

Usage: python3 pyserve.py SECONDS
"""

import sys
import time

TRACK = bytes(range(256)) * 8


def parse_subtitle_track(track):
    checksum = 0
    for byte in track:
        if byte == 0x0A:
            checksum += 1
        checksum = (checksum * 31 + byte) & 0xFFFFFFFF
    return checksum


def serve_request():
    return sum(parse_subtitle_track(TRACK) for _ in range(4))


def main(seconds):
    end = time.monotonic() + seconds
    served = 0
    while time.monotonic() < end:
        serve_request()
        served += 1
    print(served)


main(float(sys.argv[1]))
