/*
 * burn: the benchmark's CPU-bound workload with a throughput measure.
 *
 * Starts THREADS threads (default: one per online CPU) that wait at a barrier, then reads one
 * line from stdin; the line releases them, and each runs the same fixed unit of work (a
 * xorshift hash over a small buffer) in a loop for SECONDS. It prints the total number of units
 * done, the window actually measured and the CPU time its threads got in it, as
 * "units=N seconds=S cpu=C", and exits when stdin is closed.
 *
 * Why this shape: the threads exist before the tracer attaches (so `perf record -p` sees them
 * all), the measured window starts only once the tracer is attached (the bench writes the line
 * then), and one thread per CPU saturates the machine, so everything a tracer costs shows up as
 * lost units: its in-kernel sampling work and its own user-space work alike. Units per
 * CPU-second, on the other hand, only lose what is done on the workload's own time (sampling
 * interrupts and BPF programs run there; with CONFIG_IRQ_TIME_ACCOUNTING unset, interrupt time
 * is charged to the interrupted thread), and do not move when other processes take CPU from it.
 *
 * Usage: burn SECONDS [THREADS]. alarm() ends it 60 s after SECONDS whatever happens.
 * Built with frame pointers so every tracer can walk its stacks.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double seconds;
static pthread_barrier_t start;

static double clock_seconds(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now(void)
{
    return clock_seconds(CLOCK_MONOTONIC);
}

struct result {
    uint64_t units;
    double cpu;
};

/* One unit of work: hash a 256-byte buffer. */
__attribute__((noinline)) static uint64_t unit(uint64_t *buf, uint64_t seed)
{
    for (int i = 0; i < 32; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        buf[i] += seed;
    }
    return seed;
}

__attribute__((noinline)) static uint64_t work(double deadline, uint64_t seed)
{
    uint64_t buf[32] = {0};
    uint64_t units = 0;
    while (now() < deadline) {
        for (int i = 0; i < 1000; i++)
            seed = unit(buf, seed);
        units += 1000;
    }
    return units + (buf[seed & 31] == 42); /* keep buf alive */
}

static void *worker(void *arg)
{
    struct result *result = arg;
    pthread_barrier_wait(&start);
    double cpu = clock_seconds(CLOCK_THREAD_CPUTIME_ID);
    result->units = work(now() + seconds, 88172645463325252ull);
    result->cpu = clock_seconds(CLOCK_THREAD_CPUTIME_ID) - cpu;
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: burn SECONDS [THREADS]\n");
        return 2;
    }
    seconds = atof(argv[1]);
    long threads = argc > 2 ? atol(argv[2]) : sysconf(_SC_NPROCESSORS_ONLN);
    if (seconds <= 0 || threads < 1 || threads > 1024) {
        fprintf(stderr, "burn: bad arguments\n");
        return 2;
    }
    alarm((unsigned)seconds + 60);

    pthread_t *tids = calloc(threads, sizeof *tids);
    struct result *results = calloc(threads, sizeof *results);
    pthread_barrier_init(&start, NULL, threads + 1);
    for (long i = 0; i < threads; i++)
        pthread_create(&tids[i], NULL, worker, &results[i]);

    char line[64];
    if (!fgets(line, sizeof line, stdin))
        return 1;
    double begin = now();
    pthread_barrier_wait(&start);
    uint64_t total = 0;
    double cpu = 0;
    for (long i = 0; i < threads; i++) {
        pthread_join(tids[i], NULL);
        total += results[i].units;
        cpu += results[i].cpu;
    }
    printf("units=%llu seconds=%.6f cpu=%.6f\n", (unsigned long long)total, now() - begin, cpu);
    fflush(stdout);
    /* Stay alive (idle) until stdin closes, so tracers that stop when their target exits can
     * still be read after the window. */
    while (fgets(line, sizeof line, stdin))
        ;
    return 0;
}
