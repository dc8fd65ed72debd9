/* Minimal runtime linked into every graphir CPU shared object.
 *
 * MLIR's OpenMP lowering (convert-scf-to-openmp + convert-openmp-to-llvm) emits calls to a
 * handful of __kmpc_* entry points of the LLVM/Intel OpenMP ABI.  Neither libomp nor libiomp5
 * is available on the machines we target, so this file implements exactly those entry points on
 * a small persistent pthread pool.  With runtime_support.c (included at the end) it also
 * provides memrefCopy, the one MLIR runtime-utils helper the lowering may call (strided
 * memref.copy), and __truncsfbf2, so the .so needs only libc/libm/pthread.
 *
 * Every symbol is compiled with hidden visibility when GRAPHIR_HIDDEN is defined (AOT builds):
 * the kernel object binds to this copy even if another OpenMP runtime is loaded in the process.
 *
 * Thread count: GRAPHIR_NUM_THREADS, else the CPUs in this process's affinity mask.
 * Work-sharing loops use the dynamic schedule (toolchain.py asks for it): threads take chunks
 * from a shared counter, so a thread slowed down (another process on its core) takes fewer and
 * the loop does not wait for it, whatever thread count the library was compiled with. Nor does
 * a region wait for a worker that has not started it: its team is whoever joins in time (see
 * team_state).
 * A parallel region entered while another one runs (nested, or from a second caller thread)
 * runs serially on the calling thread, which is always correct for static work sharing.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef GRAPHIR_HIDDEN
#define API __attribute__((visibility("hidden")))
#else
#define API __attribute__((visibility("default")))
#endif

#define MAX_THREADS 64
#define MAX_ARGS 16
/* An idle worker spins this long for the next region before it sleeps (GRAPHIR_SPIN_US
 * overrides): long enough to catch the next kernel of a step (the executor's gap between
 * kernels is tens of microseconds), short enough not to take a core from whatever the process
 * runs next (torch, numpy). Counted in time, not pauses: a pause costs ~10 cycles on some
 * cores and ~140 on others (200,000 pauses were 3 ms on an AMX Xeon). */
#define DEFAULT_SPIN_US 200

typedef void (*microtask_t)(int32_t *, int32_t *, ...);

static __thread int32_t tl_tid = 0;
static __thread int32_t tl_nth = 1;
static __thread int32_t tl_requested = 0;

static atomic_int pool_started = 0;
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static int pool_size = 1;
static int64_t spin_ns = DEFAULT_SPIN_US * 1000;
static pthread_mutex_t team_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t wake_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cv = PTHREAD_COND_INITIALIZER;

static inline void cpu_relax(void) { __builtin_ia32_pause(); }

static int64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* One step of a wait for another member of the team: a pause, and once the wait has lasted
 * YIELD_AFTER_NS, the core given away at every step, so that a member sharing it (more
 * threads than cores, another process on them) can run. Spinning alone kept such a member
 * off until the scheduler's time slice ended: 5.7 ms a region, two threads on one CPU. */
#define YIELD_AFTER_NS 20000
typedef struct {
  unsigned spins;
  int yielding;
  int64_t t0;
} waiter_t;

static void wait_a_bit(waiter_t *w) {
  if (w->yielding) {
    sched_yield();
    return;
  }
  if ((++w->spins & 63) == 0) {
    int64_t t = now_ns();
    if (!w->t0)
      w->t0 = t;
    else if (t - w->t0 > YIELD_AFTER_NS)
      w->yielding = 1;
  }
  cpu_relax();
}

static struct {
  microtask_t fn;
  int32_t argc;
  void *args[MAX_ARGS];
} job;
static atomic_int job_done = 0; /* members other than the caller that have finished the job */

/* A region's team is whoever joins it: the calling thread (thread 0), then each worker that
 * claims a place while the region is open. The region closes when a member first needs the
 * team's size (a barrier, a static loop) or when the caller has run its part; a worker that
 * comes later (asleep, or descheduled by another process on its core) skips it. Every loop
 * being dynamic, those present take all the chunks, and no one waits for a thread that never
 * started: waiting for every worker cost ~16 ms a region (the scheduler's time slice) when the
 * other core was busy and the worker asleep. Joining and closing are one atomic word, so a
 * worker joins the region whose fields it then reads, and none joins a closed one. */
#define GEN_SHIFT 32
#define CLOSED (1ull << 31)
#define MEMBERS (CLOSED - 1)
static _Atomic uint64_t team_state = 0; /* generation << GEN_SHIFT | CLOSED | members */
static atomic_int team_size = 0;        /* the members once closed, 0 while open */
static atomic_int team_cap = 1;         /* the most members (a num_threads clause) */

static int team_close(void) {
  uint64_t s = atomic_fetch_or(&team_state, CLOSED);
  if (!(s & CLOSED)) {
    int n = (int)(s & MEMBERS);
    atomic_store_explicit(&team_size, n, memory_order_release);
    return n;
  }
  int n;
  waiter_t w = {0};
  while ((n = atomic_load_explicit(&team_size, memory_order_acquire)) == 0) wait_a_bit(&w);
  return n;
}

static inline uint32_t team_gen(uint64_t s) { return (uint32_t)(s >> GEN_SHIFT); }
static atomic_int bar_count = 0;
static atomic_int bar_gen = 0;

/* Dynamic loops of the running team. Every thread calls dispatch_init for each loop and the
 * loops are separated by barriers; the first caller of loop number n (counted per thread from
 * the team's start) sets the shared state up, the others wait for it. */
static struct {
  _Atomic int64_t next;
  int64_t ub, st, chunk;
} disp;
static atomic_long disp_claimed = 0, disp_ready = 0;
static long team_disp_base = 0;
static __thread long tl_disp_seen = 0;
static __thread struct {
  int64_t next, ub, st;
} tl_serial; /* a loop run by one thread (serial region) */

static void call_microtask(microtask_t fn, int32_t argc, void **a, int32_t tid) {
  int32_t gtid = tid, btid = tid;
  switch (argc) {
#define A(i) a[i]
  case 0: fn(&gtid, &btid); break;
  case 1: fn(&gtid, &btid, A(0)); break;
  case 2: fn(&gtid, &btid, A(0), A(1)); break;
  case 3: fn(&gtid, &btid, A(0), A(1), A(2)); break;
  case 4: fn(&gtid, &btid, A(0), A(1), A(2), A(3)); break;
  case 5: fn(&gtid, &btid, A(0), A(1), A(2), A(3), A(4)); break;
  case 6: fn(&gtid, &btid, A(0), A(1), A(2), A(3), A(4), A(5)); break;
  case 7: fn(&gtid, &btid, A(0), A(1), A(2), A(3), A(4), A(5), A(6)); break;
  case 8: fn(&gtid, &btid, A(0), A(1), A(2), A(3), A(4), A(5), A(6), A(7)); break;
  default:
    fn(&gtid, &btid, A(0), A(1), A(2), A(3), A(4), A(5), A(6), A(7), A(8), A(9), A(10), A(11),
       A(12), A(13), A(14), A(15));
    break;
#undef A
  }
}

static void *worker_main(void *arg) {
  (void)arg;
  uint32_t seen = 0;
  for (;;) {
    int64_t spin_until = now_ns() + spin_ns;
    unsigned spins = 0;
    while (team_gen(atomic_load_explicit(&team_state, memory_order_acquire)) == seen) {
      if ((++spins & 63) != 0 || now_ns() < spin_until) {
        cpu_relax();
        continue;
      }
      pthread_mutex_lock(&wake_mu);
      while (team_gen(atomic_load(&team_state)) == seen) pthread_cond_wait(&wake_cv, &wake_mu);
      pthread_mutex_unlock(&wake_mu);
    }
    /* Join the open region, if there is room; a failed exchange rereads the state (it may
     * be a newer region by then, which is as good). */
    uint64_t s = atomic_load_explicit(&team_state, memory_order_acquire);
    int32_t tid = -1;
    while (!(s & CLOSED) &&
           (int)(s & MEMBERS) < atomic_load_explicit(&team_cap, memory_order_relaxed)) {
      if (atomic_compare_exchange_weak_explicit(&team_state, &s, s + 1, memory_order_acq_rel,
                                                memory_order_acquire)) {
        tid = (int32_t)(s & MEMBERS);
        break;
      }
    }
    seen = team_gen(s);
    if (tid < 0) continue; /* closed or full: wait for the next region */
    /* The caller writes the next region's fields only after every member has finished. */
    tl_tid = tid;
    tl_nth = atomic_load_explicit(&team_cap, memory_order_relaxed);
    tl_disp_seen = team_disp_base;
    call_microtask(job.fn, job.argc, job.args, tid);
    tl_tid = 0;
    tl_nth = 1;
    atomic_fetch_add_explicit(&job_done, 1, memory_order_release);
  }
  return NULL;
}

#if defined(__x86_64__) && defined(__linux__)
#include <sys/syscall.h>
/* AMX tiles (lowerings/amx_matmul.py) fault with SIGILL until Linux grants the process their
 * state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18). The grant is process-wide and
 * idempotent; on a CPU or kernel without AMX the call fails harmlessly, and a library built with
 * amx is refused by name before it is loaded there (cpu_target.check_host). */
__attribute__((constructor)) static void request_amx_state(void) {
  syscall(SYS_arch_prctl, 0x1023, 18);
}
#endif

static void pool_init(void) {
  const char *env = getenv("GRAPHIR_NUM_THREADS");
  int n = env ? atoi(env) : 0;
  if (n <= 0) {
    cpu_set_t set;
    n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  }
  if (n > MAX_THREADS) n = MAX_THREADS;
  const char *spin = getenv("GRAPHIR_SPIN_US");
  if (spin && *spin) spin_ns = (int64_t)atoll(spin) * 1000;
  pool_size = 1;
  for (int i = 1; i < n; ++i) {
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 8 << 20);
    if (pthread_create(&t, &attr, worker_main, (void *)(intptr_t)i) != 0) break;
    pool_size = i + 1;
  }
}

static void pool_start(void) {
  if (atomic_load_explicit(&pool_started, memory_order_acquire)) return;
  pthread_mutex_lock(&pool_mu);
  if (!atomic_load(&pool_started)) {
    pool_init();
    atomic_store_explicit(&pool_started, 1, memory_order_release);
  }
  pthread_mutex_unlock(&pool_mu);
}

/* fork() copies only the calling thread: a child has none of the pool's workers, and the locks
 * may be held by threads that are gone (the caller then waited forever for its workers). The
 * child starts afresh, its first region starting a pool of its own. glibc drops the handler
 * when this library is unloaded. */
static void pool_after_fork_in_child(void) {
  pthread_mutex_init(&pool_mu, NULL);
  pthread_mutex_init(&team_lock, NULL);
  pthread_mutex_init(&wake_mu, NULL);
  pthread_cond_init(&wake_cv, NULL);
  pool_size = 1;
  uint64_t gen = team_gen(atomic_load(&team_state));
  atomic_store(&team_state, (gen << GEN_SHIFT) | CLOSED);
  atomic_store(&job_done, 0);
  atomic_store(&team_size, 0);
  atomic_store(&bar_count, 0);
  tl_tid = 0;
  tl_nth = 1;
  atomic_store(&pool_started, 0);
}

__attribute__((constructor)) static void pool_register_fork_handler(void) {
  pthread_atfork(NULL, NULL, pool_after_fork_in_child);
}

API int32_t __kmpc_global_thread_num(void *loc) {
  (void)loc;
  return tl_tid;
}

API void __kmpc_push_num_threads(void *loc, int32_t gtid, int32_t n) {
  (void)loc;
  (void)gtid;
  tl_requested = n;
}

API void __kmpc_fork_call(void *loc, int32_t argc, microtask_t fn, ...) {
  (void)loc;
  void *args[MAX_ARGS] = {0};
  va_list ap;
  va_start(ap, fn);
  for (int i = 0; i < argc && i < MAX_ARGS; ++i) args[i] = va_arg(ap, void *);
  va_end(ap);
  int32_t requested = tl_requested;
  tl_requested = 0;

  pool_start();
  int nth = pool_size;
  if (requested > 0 && requested < nth) nth = requested;
  if (tl_nth > 1 || nth <= 1 || pthread_mutex_trylock(&team_lock) != 0) {
    int32_t saved_tid = tl_tid, saved_nth = tl_nth;
    tl_tid = 0;
    tl_nth = 1;
    call_microtask(fn, argc, args, 0);
    tl_tid = saved_tid;
    tl_nth = saved_nth;
    return;
  }
  job.fn = fn;
  job.argc = argc;
  memcpy(job.args, args, sizeof(args));
  atomic_store_explicit(&team_cap, nth, memory_order_relaxed);
  team_disp_base = atomic_load(&disp_claimed);
  tl_disp_seen = team_disp_base;
  atomic_store(&job_done, 0);
  atomic_store(&team_size, 0);
  uint64_t gen = (uint64_t)team_gen(atomic_load(&team_state)) + 1;
  pthread_mutex_lock(&wake_mu);
  /* Open, with the caller as member 0; the release publishes the fields above. */
  atomic_store_explicit(&team_state, (gen << GEN_SHIFT) | 1, memory_order_release);
  pthread_cond_broadcast(&wake_cv);
  pthread_mutex_unlock(&wake_mu);

  tl_tid = 0;
  tl_nth = nth;
  call_microtask(fn, argc, args, 0);
  tl_nth = 1;
  int members = team_close();
  waiter_t w = {0};
  while (atomic_load_explicit(&job_done, memory_order_acquire) < members - 1) wait_a_bit(&w);
  pthread_mutex_unlock(&team_lock);
}

API void __kmpc_barrier(void *loc, int32_t gtid) {
  (void)loc;
  (void)gtid;
  if (tl_nth <= 1) return;
  int nth = team_close(); /* the members: none can join once one has reached a barrier */
  int gen = atomic_load_explicit(&bar_gen, memory_order_acquire);
  if (atomic_fetch_add(&bar_count, 1) + 1 == nth) {
    atomic_store(&bar_count, 0);
    atomic_fetch_add_explicit(&bar_gen, 1, memory_order_release);
  } else {
    waiter_t w = {0};
    while (atomic_load_explicit(&bar_gen, memory_order_acquire) == gen) wait_a_bit(&w);
  }
}

/* Static schedule: contiguous, balanced blocks (kind 34) or round-robin chunks (kind 33).
 * Bounds are inclusive; an empty share is returned as lower = upper + incr. */
#define STATIC_INIT(NAME, T, ST)                                                              \
  API void NAME(void *loc, int32_t gtid, int32_t kind, int32_t *plast, T *plower, T *pupper, \
                ST *pstride, ST incr, ST chunk) {                                            \
    (void)loc;                                                                               \
    (void)gtid;                                                                              \
    uint64_t nth = tl_nth > 1 ? (uint64_t)team_close() : 1, tid = (uint64_t)tl_tid;         \
    T lo = *plower, hi = *pupper;                                                            \
    if (incr == 0) incr = 1;                                                                 \
    uint64_t trip = incr > 0 ? (uint64_t)((hi - lo) / (T)incr) + 1                           \
                             : (uint64_t)((lo - hi) / (T)(-incr)) + 1;                       \
    if ((incr > 0 && hi < lo) || (incr < 0 && lo < hi)) trip = 0;                           \
    if (kind == 33 && chunk > 0) {                                                           \
      *plower = lo + (T)(tid * chunk * incr);                                                \
      *pupper = *plower + (T)((chunk - 1) * incr);                                           \
      *pstride = (ST)(nth * chunk * incr);                                                   \
      uint64_t nchunks = (trip + chunk - 1) / chunk;                                         \
      *plast = nchunks > 0 && ((nchunks - 1) % nth) == tid;                        \
      return;                                                                                \
    }                                                                                        \
    uint64_t base = trip / nth, extra = trip % nth;                                          \
    uint64_t mine = base + (tid < extra ? 1 : 0);                                  \
    uint64_t start = tid * base + (tid < extra ? tid : extra);                     \
    *pstride = (ST)(trip * incr);                                                            \
    if (mine == 0) {                                                                         \
      *plower = hi + (T)incr;                                                                \
      *pupper = hi;                                                                          \
      *plast = 0;                                                                            \
      return;                                                                                \
    }                                                                                        \
    *plower = lo + (T)(start * incr);                                                        \
    *pupper = lo + (T)((start + mine - 1) * incr);                                           \
    *plast = start + mine == trip;                                                           \
  }

STATIC_INIT(__kmpc_for_static_init_4, int32_t, int32_t)
STATIC_INIT(__kmpc_for_static_init_4u, uint32_t, int32_t)
STATIC_INIT(__kmpc_for_static_init_8, int64_t, int64_t)
STATIC_INIT(__kmpc_for_static_init_8u, uint64_t, int64_t)

API void __kmpc_for_static_fini(void *loc, int32_t gtid) {
  (void)loc;
  (void)gtid;
}

/* Dynamic schedule: bounds are inclusive, as for the static one. A chunk is at least 1/4 of a
 * thread's fair share, so a loop of many tiny iterations takes few atomic operations. */
static void dispatch_init(int64_t lb, int64_t ub, int64_t st, int64_t chunk) {
  if (st == 0) st = 1;
  if (tl_nth <= 1) {
    tl_serial.next = lb;
    tl_serial.ub = ub;
    tl_serial.st = st;
    return;
  }
  long mine = ++tl_disp_seen, prev = mine - 1;
  if (atomic_compare_exchange_strong(&disp_claimed, &prev, mine)) {
    int64_t trip = st > 0 ? (ub >= lb ? (ub - lb) / st + 1 : 0) : (lb >= ub ? (lb - ub) / -st + 1 : 0);
    int64_t share = (trip + 4 * (int64_t)tl_nth - 1) / (4 * (int64_t)tl_nth);
    disp.ub = ub;
    disp.st = st;
    disp.chunk = chunk > share ? chunk : (share > 0 ? share : 1);
    atomic_store_explicit(&disp.next, lb, memory_order_relaxed);
    atomic_store_explicit(&disp_ready, mine, memory_order_release);
  } else {
    waiter_t w = {0};
    while (atomic_load_explicit(&disp_ready, memory_order_acquire) < mine) wait_a_bit(&w);
  }
}

static int dispatch_next(int32_t *plast, int64_t *plb, int64_t *pub, int64_t *pst) {
  if (tl_nth <= 1) {
    int64_t lo = tl_serial.next, hi = tl_serial.ub, st = tl_serial.st;
    if (st > 0 ? lo > hi : lo < hi) return 0;
    tl_serial.next = hi + st;
    *plb = lo, *pub = hi, *pst = st, *plast = 1;
    return 1;
  }
  int64_t st = disp.st, ub = disp.ub, step = disp.chunk * st;
  int64_t lo = atomic_fetch_add_explicit(&disp.next, step, memory_order_relaxed);
  if (st > 0 ? lo > ub : lo < ub) return 0;
  int64_t hi = lo + step - st;
  if (st > 0 ? hi >= ub : hi <= ub) hi = ub;
  *plb = lo, *pub = hi, *pst = st, *plast = hi == ub;
  return 1;
}

#define DISPATCH(SUFFIX, T, ST)                                                              \
  API void __kmpc_dispatch_init_##SUFFIX(void *loc, int32_t gtid, int32_t sched, T lb, T ub, \
                                         ST st, ST chunk) {                                  \
    (void)loc, (void)gtid, (void)sched;                                                      \
    dispatch_init((int64_t)lb, (int64_t)ub, (int64_t)st, (int64_t)chunk);                    \
  }                                                                                          \
  API int32_t __kmpc_dispatch_next_##SUFFIX(void *loc, int32_t gtid, int32_t *plast, T *plb,  \
                                            T *pub, ST *pst) {                               \
    (void)loc, (void)gtid;                                                                   \
    int64_t lo, hi, st;                                                                      \
    if (!dispatch_next(plast, &lo, &hi, &st)) return 0;                                      \
    *plb = (T)lo, *pub = (T)hi, *pst = (ST)st;                                               \
    return 1;                                                                                \
  }                                                                                          \
  API void __kmpc_dispatch_fini_##SUFFIX(void *loc, int32_t gtid) { (void)loc, (void)gtid; }

DISPATCH(4, int32_t, int32_t)
DISPATCH(4u, uint32_t, int32_t)
DISPATCH(8, int64_t, int64_t)
DISPATCH(8u, uint64_t, int64_t)

/* memrefCopy and __truncsfbf2: runtime_support.c, one translation unit with this file. */
#include "runtime_support.c"
