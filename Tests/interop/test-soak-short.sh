#!/usr/bin/env bash
# The soak's short version (Tools/stress --soak runs it for 30 minutes): three 15 s
# "minutes" of two fio --verify jobs on a CBT VDI, each ending in a snapshot, an
# incremental backup checked against it, the older snapshot destroyed and a scan; RSS and
# descriptors flat, no fio or log error, the files check clean. Each fio job is held to
# 500 IOPS, so the test leaves a CPU to the one Tools/test runs beside it.
MINUTES=3 SOAK_PERIOD=15 SOAK_RATE_IOPS=500 exec bash "$(dirname "$0")/soak.sh"
