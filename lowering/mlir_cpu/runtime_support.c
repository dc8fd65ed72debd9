/* The runtime's other two entry points, compiled as part of parallel_runtime.c (which
 * #includes this file, so that API, the includes and the visibility rules are shared): the one
 * MLIR runtime-utils helper the lowering may call, and the one libcall LLVM may emit. */

/* memrefCopy(elem_size, UnrankedMemRef *src, UnrankedMemRef *dst) for strided copies.
 * Bufferization turns a copy into memref.copy where it can (a split's slices of a matmul's
 * result, for one), so this is on the hot path: the trailing dimensions that are contiguous in
 * both memrefs are merged into one run and each run is one memcpy; only the outer indices are
 * walked, with offsets stepped rather than recomputed. (One memcpy per element, as before, ran
 * a 512 x 3648 float split at ~1 GB/s.) */
typedef struct {
  int64_t rank;
  void *descriptor;
} unranked_t;

#define COPY_MAX_RANK 64

API void memrefCopy(int64_t elem_size, unranked_t *src, unranked_t *dst) {
  int64_t rank = src->rank;
  /* descriptor: allocated, aligned, offset, sizes[rank], strides[rank] */
  char **sd = (char **)src->descriptor, **dd = (char **)dst->descriptor;
  int64_t *sm = (int64_t *)(sd + 2), *dm = (int64_t *)(dd + 2);
  char *sp = sd[1] + sm[0] * elem_size, *dp = dd[1] + dm[0] * elem_size;
  int64_t *sizes = sm + 1, *sstr = sm + 1 + rank, *dstr = dm + 1 + rank;
  for (int64_t i = 0; i < rank; ++i)
    if (sizes[i] == 0) return;
  if (rank == 0) {
    memcpy(dp, sp, elem_size);
    return;
  }
  /* Merge trailing dimensions while both memrefs keep them contiguous: the run is `inner`
   * elements, or one element when the last dimension is strided in either. */
  int64_t inner = 1, outer_rank = rank;
  if (sstr[rank - 1] == 1 && dstr[rank - 1] == 1) {
    inner = sizes[rank - 1];
    outer_rank = rank - 1;
    while (outer_rank > 0 && sstr[outer_rank - 1] == inner &&
           dstr[outer_rank - 1] == inner) {
      inner *= sizes[outer_rank - 1];
      --outer_rank;
    }
  }
  size_t run = (size_t)(inner * elem_size);
  if (outer_rank == 0) {
    memmove(dp, sp, run);
    return;
  }
  /* The last walked dimension is the inner loop (strided runs); the ones above it carry. */
  int64_t last = outer_rank - 1, n_last = sizes[last];
  int64_t s_step = sstr[last] * elem_size, d_step = dstr[last] * elem_size;
  int64_t small[COPY_MAX_RANK] = {0};
  int64_t *idx = last <= COPY_MAX_RANK ? small : calloc(last, sizeof(int64_t));
  if (!idx) abort(); /* out of memory for a rank > 64 copy's indices */
  int64_t so = 0, doff = 0;
  for (;;) {
    char *s = sp + so * elem_size, *t = dp + doff * elem_size;
    /* Runs of one element (a transpose, a strided slice) by fixed-size moves: memcpy of a
     * constant size compiles to one load and store. */
    switch (run) {
#define RUNS(N)                                   \
  case N:                                         \
    for (int64_t i = 0; i < n_last; ++i) {        \
      memcpy(t, s, N);                            \
      s += s_step;                                \
      t += d_step;                                \
    }                                             \
    break;
      RUNS(1) RUNS(2) RUNS(4) RUNS(8)
#undef RUNS
    default:
      for (int64_t i = 0; i < n_last; ++i) {
        memcpy(t, s, run);
        s += s_step;
        t += d_step;
      }
    }
    int64_t d = last - 1;
    for (; d >= 0; --d) {
      so += sstr[d];
      doff += dstr[d];
      if (++idx[d] < sizes[d]) break;
      so -= sstr[d] * sizes[d];
      doff -= dstr[d] * sizes[d];
      idx[d] = 0;
    }
    if (d < 0) break;
  }
  if (idx != small) free(idx);
}

/* __truncsfbf2(float) -> bf16, the libcall LLVM emits for a bf16 value it promoted to f32
 * (e.g. a bf16 copy kernel's load/store) on x86 targets without AVX512-BF16. The psABI returns
 * a __bf16 in the low 16 bits of xmm0, so this returns a float carrying those bits (older C
 * compilers have no __bf16 type). Rounds to nearest even; NaNs stay (quiet) NaNs. */
API float __truncsfbf2(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  uint32_t bits = ((u & 0x7fffffffu) > 0x7f800000u)
                      ? ((u >> 16) | 0x40u)
                      : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  float out;
  memcpy(&out, &bits, sizeof out);
  return out;
}
