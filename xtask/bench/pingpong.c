// Context-switch-heavy workload for the offcpu benchmark: two processes pinned to one CPU pass
// a byte back and forth over two pipes, so every round trip is two context switches.
// Usage: pingpong SECONDS [CPU]   prints "ns_per_round_trip N" after a 0.5 s warm-up.
#define _GNU_SOURCE
#include <sched.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 3;
    int cpu = argc > 2 ? atoi(argv[2]) : 0;
    alarm((unsigned)seconds + 10);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);
    int ping[2], pong[2];
    if (pipe(ping) || pipe(pong)) return 1;
    char byte = 0;
    pid_t child = fork();
    if (child == 0) {
        // alarm() is not inherited; and with the unused ends closed, the parent's exit ends the
        // child's read with end-of-file.
        alarm((unsigned)seconds + 10);
        close(ping[1]);
        close(pong[0]);
        for (;;) {
            if (read(ping[0], &byte, 1) != 1) _exit(0);
            if (write(pong[1], &byte, 1) != 1) _exit(0);
        }
    }
    double warm_end = now() + 0.5;
    while (now() < warm_end) {
        write(ping[1], &byte, 1);
        read(pong[0], &byte, 1);
    }
    long trips = 0;
    double start = now(), end = start + seconds;
    while (now() < end) {
        for (int i = 0; i < 100; i++) {
            write(ping[1], &byte, 1);
            read(pong[0], &byte, 1);
        }
        trips += 100;
    }
    printf("ns_per_round_trip %.1f\n", (now() - start) * 1e9 / trips);
    close(ping[1]);
    waitpid(child, NULL, 0);
    return 0;
}
