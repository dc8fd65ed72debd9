/* Drives parallel_runtime.c the way MLIR's OpenMP lowering does (a region: one dynamic loop,
 * then a barrier) for test_parallel_team.py. Every iteration must run exactly once.
 *
 *   team_harness stress REGIONS SEED   random loop sizes, member delays, idle gaps, caps
 *   team_harness absent REGIONS        the workers held in a signal handler (as if another
 *                                      process had their cores): regions must still finish
 *   team_harness fork REGIONS          regions in a forked child, which starts its own pool
 * Prints "ok ..." and exits 0, or names what went wrong and exits 1 (SIGALRM: a hang). */
#define _GNU_SOURCE
#include <dirent.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef void (*microtask_t)(int32_t *, int32_t *, ...);
void __kmpc_fork_call(void *loc, int32_t argc, microtask_t fn, ...);
void __kmpc_push_num_threads(void *loc, int32_t gtid, int32_t n);
void __kmpc_barrier(void *loc, int32_t gtid);
void __kmpc_dispatch_init_8u(void *, int32_t, int32_t, uint64_t, uint64_t, int64_t, int64_t);
int32_t __kmpc_dispatch_next_8u(void *, int32_t, int32_t *, uint64_t *, uint64_t *, int64_t *);
int32_t __kmpc_global_thread_num(void *);

typedef struct {
  atomic_int *hits;
  uint64_t n;
  int loops, delay_us;
  atomic_int max_tid;
} work_t;

static void task(int32_t *gtid, int32_t *btid, work_t *w) {
  (void)gtid, (void)btid;
  int32_t tid = __kmpc_global_thread_num(NULL);
  int prev = atomic_load(&w->max_tid);
  while (tid > prev && !atomic_compare_exchange_weak(&w->max_tid, &prev, tid)) {}
  if (w->delay_us && tid != 0) usleep((useconds_t)(rand() % w->delay_us)); /* a late member */
  for (int l = 0; l < w->loops; ++l) {
    __kmpc_dispatch_init_8u(NULL, tid, 1073741859, 0, w->n - 1, 1, 1);
    int32_t last;
    uint64_t lo, hi;
    int64_t st;
    while (__kmpc_dispatch_next_8u(NULL, tid, &last, &lo, &hi, &st))
      for (uint64_t i = lo; i <= hi; ++i) atomic_fetch_add(&w->hits[(uint64_t)l * w->n + i], 1);
    __kmpc_barrier(NULL, tid);
  }
}

/* One region of `loops` loops over n iterations; 1 if every iteration ran once. */
static int region(uint64_t n, int loops, int delay_us, int cap, int *max_tid) {
  work_t w = {calloc(n * (uint64_t)loops, sizeof(atomic_int)), n, loops, delay_us, 0};
  if (cap) __kmpc_push_num_threads(NULL, 0, cap);
  __kmpc_fork_call(NULL, 1, (microtask_t)task, &w);
  int ok = 1;
  for (uint64_t i = 0; i < n * (uint64_t)loops; ++i)
    if (w.hits[i] != 1) {
      printf("iteration %lu of %lu ran %d times\n", (unsigned long)i, (unsigned long)n,
             w.hits[i]);
      ok = 0;
      break;
    }
  free(w.hits);
  *max_tid = atomic_load(&w.max_tid);
  return ok;
}

static atomic_int held, release_them;

static void hold(int sig) {
  (void)sig;
  atomic_fetch_add(&held, 1);
  struct timespec ms = {0, 1000000};
  while (!atomic_load(&release_them)) nanosleep(&ms, NULL);
}

/* Park every other thread of the process (the pool's workers) in `hold`. */
static int hold_workers(void) {
  signal(SIGUSR1, hold);
  DIR *d = opendir("/proc/self/task");
  struct dirent *e;
  int sent = 0;
  pid_t me = (pid_t)syscall(SYS_gettid);
  while ((e = readdir(d)) != NULL) {
    pid_t t = (pid_t)atoi(e->d_name);
    if (t > 0 && t != me) sent += syscall(SYS_tgkill, getpid(), t, SIGUSR1) == 0;
  }
  closedir(d);
  while (atomic_load(&held) < sent) usleep(100);
  return sent;
}

static int threads_now(void) {
  DIR *d = opendir("/proc/self/task");
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL) n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

/* A child forked after the pool started: its first region starts a pool of its own. */
static int forked(int regions) {
  int max_tid, pool = atoi(getenv("GRAPHIR_NUM_THREADS"));
  if (!region(100, 1, 0, 0, &max_tid)) return 1;
  pid_t pid = fork();
  if (pid == 0) {
    alarm(60);
    if (threads_now() != 1) _exit(3);
    for (int r = 0; r < regions; ++r)
      if (!region(1 + (uint64_t)(r * 37 % 3000), 2, 0, 0, &max_tid)) _exit(1);
    if (threads_now() != pool) {
      printf("the child runs %d threads, not %d\n", threads_now(), pool);
      _exit(4);
    }
    fflush(stdout);
    _exit(0);
  }
  int status;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    printf("the forked child failed: status %d\n", status);
    return 1;
  }
  printf("ok %d regions in a forked child with a pool of %d\n", regions, pool);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  alarm(60);
  int regions = atoi(argv[2]), max_tid;
  if (!strcmp(argv[1], "stress")) {
    srand((unsigned)atoi(argv[3]));
    for (int r = 0; r < regions; ++r) {
      uint64_t n = 1 + (uint64_t)(rand() % 3000);
      int cap = rand() % 4 == 0 ? 1 + rand() % 3 : 0;
      if (rand() % 8 == 0) usleep((useconds_t)(rand() % 3000)); /* let the workers sleep */
      if (!region(n, 1 + rand() % 3, rand() % 4 == 0 ? 300 : 0, cap, &max_tid)) return 1;
      if (cap && max_tid >= cap) {
        printf("a region capped at %d threads ran thread %d\n", cap, max_tid);
        return 1;
      }
    }
    printf("ok %d regions\n", regions);
    return 0;
  }
  if (!strcmp(argv[1], "fork")) return forked(regions);
  if (!region(100, 1, 0, 0, &max_tid)) return 1; /* starts the pool */
  int workers = hold_workers();
  for (int r = 0; r < regions; ++r)
    if (!region(1 + (uint64_t)(r * 37 % 500), 2, 0, 0, &max_tid)) return 1;
  if (max_tid != 0) {
    printf("a held worker ran thread %d\n", max_tid);
    return 1;
  }
  atomic_store(&release_them, 1);
  for (int r = 0; r < regions; ++r)
    if (!region(2000, 2, 0, 0, &max_tid)) return 1;
  printf("ok %d regions with %d workers held, then %d with them back\n", regions, workers,
         regions);
  return 0;
}
