/* memfill MEBIBYTES [SEED]: fills that much anonymous memory with known data (a pseudo-random word per 8 bytes,
 * derived from its position and the seed), then reads it all back and checks every word. With more than the
 * machine's memory, most of it is swapped out while filling and swapped in while checking: the swap test of the
 * kernel-client VM (tests/Spindle.Kernel.Tests/SwapTests.cs). Prints one summary line; exit status 0 only when every
 * word matched. Built statically by build.sh so it runs in the guest without libraries. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t word_at(uint64_t index, uint64_t seed) {
    /* splitmix64 of the position: every word differs, and any word can be recomputed on its own. */
    uint64_t z = index * 0x9e3779b97f4a7c15ULL + seed;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: memfill MEBIBYTES [SEED]\n");
        return 2;
    }
    uint64_t mib = strtoull(argv[1], NULL, 10);
    uint64_t seed = argc > 2 ? strtoull(argv[2], NULL, 10) : 1;
    size_t bytes = (size_t)mib << 20;
    uint64_t *memory = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
        perror("memfill: mmap");
        return 1;
    }
    size_t words = bytes / sizeof(uint64_t);
    double start = now();
    for (size_t i = 0; i < words; i++)
        memory[i] = word_at(i, seed);
    double filled = now();
    size_t mismatches = 0;
    for (size_t i = 0; i < words; i++)
        if (memory[i] != word_at(i, seed))
            mismatches++;
    double checked = now();
    printf("memfill: %llu MiB filled in %.1f s, checked in %.1f s, %zu mismatched words\n",
           (unsigned long long)mib, filled - start, checked - filled, mismatches);
    return mismatches == 0 ? 0 : 1;
}
