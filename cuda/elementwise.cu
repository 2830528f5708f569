// elementwise.cu — unary fwd/bwd, strided broadcasting binary ops, axpy, scale_shift,
// row softmax, and the SGD / AdamW updates. Twins of the ql_* kernels of the same names.
// Versions: one each, grid-stride loops (memory-bound); softmax: one block per row with
// shared-memory reductions. Transcendentals use CUDA's precise expf/logf/tanhf (<= 2 ulp from
// glibc), so float results match the CPU within the tolerance the tests state.
#include "common.cuh"

enum { RELU = 0, SIGMOID = 1, SILU = 2, EXP = 3, LOG = 4, NEG = 5, ABS = 6, SQRT = 7, TANH = 8, GELU = 9 };
enum { ADD = 0, SUB = 1, MUL = 2, DIV = 3, MAX = 4, MIN = 5 };

#define GRID_STRIDE(i, n) for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

__device__ __forceinline__ float sigmoid_stable(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

__global__ void unary_fwd_kernel(int op, float *y, const float *x, int64_t n) {
    GRID_STRIDE(i, n) {
        float v = x[i], r;
        switch (op) {
        case RELU: r = v > 0.0f ? v : 0.0f; break;
        case SIGMOID: r = sigmoid_stable(v); break;
        case SILU: r = v * sigmoid_stable(v); break;
        case EXP: r = expf(v); break;
        case LOG: r = logf(v); break;
        case NEG: r = -v; break;
        case ABS: r = fabsf(v); break;
        case SQRT: r = sqrtf(v); break;
        case GELU: r = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f)); break;
        default: r = tanhf(v); break;
        }
        y[i] = r;
    }
}

__global__ void unary_bwd_kernel(int op, float *dx, const float *dy, const float *x, const float *y, int64_t n) {
    GRID_STRIDE(i, n) {
        float g = dy[i], d;
        switch (op) {
        case RELU: d = x[i] > 0.0f ? g : 0.0f; break;
        case SIGMOID: d = g * y[i] * (1.0f - y[i]); break;
        case SILU: { float s = sigmoid_stable(x[i]); d = g * s * (1.0f + x[i] * (1.0f - s)); break; }
        case EXP: d = g * y[i]; break;
        case LOG: d = g / x[i]; break;
        case NEG: d = -g; break;
        case ABS: d = x[i] > 0.0f ? g : (x[i] < 0.0f ? -g : 0.0f); break;
        case SQRT: d = g * 0.5f / y[i]; break;
        case GELU: { float v = x[i]; d = g * (0.5f * (1.0f + erff(v * 0.70710678118654752f)) + v * 0.39894228040143268f * expf(-0.5f * v * v)); break; }
        default: d = g * (1.0f - y[i] * y[i]); break;
        }
        dx[i] += d;
    }
}


static int unary_fwd(qlc_stream s, int op, float *y, const float *x, int64_t n) {
    if (op < RELU || op > GELU || n < 0) return qlc_fail(QLC_EINVAL, "unary_fwd: op %d, n %lld", op, (long long)n);
    if (n == 0) return QLC_OK;
    unary_fwd_kernel<<<grid(n), 256, 0, as_stream(s)>>>(op, y, x, n);
    return qlc_check_launch("unary_fwd");
}

static int unary_bwd(qlc_stream s, int op, float *dx, const float *dy, const float *x, const float *y, int64_t n) {
    if (op < RELU || op > GELU || n < 0) return qlc_fail(QLC_EINVAL, "unary_bwd: op %d, n %lld", op, (long long)n);
    if ((op == SIGMOID || op == EXP || op == SQRT || op == TANH) && !y) return qlc_fail(QLC_EINVAL, "unary_bwd: op %d needs y", op);
    if (n == 0) return QLC_OK;
    unary_bwd_kernel<<<grid(n), 256, 0, as_stream(s)>>>(op, dx, dy, x, y, n);
    return qlc_check_launch("unary_bwd");
}

struct Strides {
    int ndim;
    int64_t shape[QLC_MAX_DIMS], a[QLC_MAX_DIMS], b[QLC_MAX_DIMS];
};

__global__ void binary_kernel(int op, float *out, const float *a, const float *b, Strides st, int64_t total) {
    GRID_STRIDE(i, total) {
        int64_t rem = i, oa = 0, ob = 0;
        for (int d = st.ndim - 1; d >= 0; d--) {
            int64_t idx = rem % st.shape[d];
            rem /= st.shape[d];
            oa += idx * st.a[d];
            ob += idx * st.b[d];
        }
        float x = a[oa], y = b[ob], r;
        switch (op) {
        case ADD: r = x + y; break;
        case SUB: r = x - y; break;
        case MUL: r = x * y; break;
        case DIV: r = x / y; break;
        case MAX: r = x >= y ? x : y; break;
        default: r = x <= y ? x : y; break;
        }
        out[i] = r;
    }
}

static int binary_strided(qlc_stream s, int op, float *out, const float *a, const int64_t *as, const float *b,
                          const int64_t *bs, const int64_t *shape, int ndim) {
    if (op < ADD || op > MIN || ndim < 0 || ndim > QLC_MAX_DIMS) return qlc_fail(QLC_EINVAL, "binary_strided: op %d, ndim %d", op, ndim);
    Strides st;
    st.ndim = ndim;
    int64_t total = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0) return qlc_fail(QLC_EINVAL, "binary_strided: negative dim");
        st.shape[d] = shape[d];
        st.a[d] = as[d];
        st.b[d] = bs[d];
        total *= shape[d];
    }
    if (total == 0) return QLC_OK;
    binary_kernel<<<grid(total), 256, 0, as_stream(s)>>>(op, out, a, b, st, total);
    return qlc_check_launch("binary_strided");
}

__global__ void axpy_kernel(float *y, float a, const float *x, int64_t n) { GRID_STRIDE(i, n) y[i] += a * x[i]; }
__global__ void scale_shift_kernel(float *y, const float *x, float a, float b, int64_t n) { GRID_STRIDE(i, n) y[i] = a * x[i] + b; }

static int axpy(qlc_stream s, float *y, float a, const float *x, int64_t n) {
    if (n < 0) return qlc_fail(QLC_EINVAL, "axpy: n < 0");
    if (n == 0) return QLC_OK;
    axpy_kernel<<<grid(n), 256, 0, as_stream(s)>>>(y, a, x, n);
    return qlc_check_launch("axpy");
}
static int scale_shift(qlc_stream s, float *y, const float *x, float a, float b, int64_t n) {
    if (n < 0) return qlc_fail(QLC_EINVAL, "scale_shift: n < 0");
    if (n == 0) return QLC_OK;
    scale_shift_kernel<<<grid(n), 256, 0, as_stream(s)>>>(y, x, a, b, n);
    return qlc_check_launch("scale_shift");
}

// One block per row: max, then sum of exp (in double, as the CPU), then scale.
__global__ void softmax_kernel(float *y, const float *x, int cols) {
    __shared__ float smax[256];
    __shared__ double ssum[256];
    const float *xr = x + (size_t)blockIdx.x * cols;
    float *yr = y + (size_t)blockIdx.x * cols;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, xr[c]);
    smax[threadIdx.x] = m;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + o]);
        __syncthreads();
    }
    m = smax[0];
    double sum = 0;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) { float e = expf(xr[c] - m); yr[c] = e; sum += e; }
    ssum[threadIdx.x] = sum;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) ssum[threadIdx.x] += ssum[threadIdx.x + o];
        __syncthreads();
    }
    float inv = (float)(1.0 / ssum[0]);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) yr[c] *= inv;
}

static int softmax_rows(qlc_stream s, float *y, const float *x, int64_t rows, int cols) {
    if (rows < 0 || cols <= 0 || rows > 2147483647LL) return qlc_fail(QLC_EINVAL, "softmax_rows: rows %lld, cols %d", (long long)rows, cols);
    if (rows == 0) return QLC_OK;
    softmax_kernel<<<(unsigned)rows, 256, 0, as_stream(s)>>>(y, x, cols);
    return qlc_check_launch("softmax_rows");
}

__global__ void sgd_kernel(float *p, float *buf, const float *grad, int64_t n, float lr, float momentum, float wd,
                           int nesterov, int first) {
    GRID_STRIDE(i, n) {
        float g = grad[i] + wd * p[i], d = g;
        if (momentum != 0.0f) {
            float b = first ? g : momentum * buf[i] + g;
            buf[i] = b;
            d = nesterov ? g + momentum * b : b;
        }
        p[i] -= lr * d;
    }
}

static int sgd_update(qlc_stream s, float *p, float *buf, const float *grad, int64_t n, float lr, float momentum,
                      float wd, int nesterov, int first) {
    if (n < 0 || (momentum != 0.0f && !buf)) return qlc_fail(QLC_EINVAL, "sgd_update: bad arguments");
    if (n == 0) return QLC_OK;
    sgd_kernel<<<grid(n), 256, 0, as_stream(s)>>>(p, buf, grad, n, lr, momentum, wd, nesterov, first);
    return qlc_check_launch("sgd_update");
}

__global__ void adamw_kernel(float *p, float *m, float *v, const float *grad, int64_t n, float lr, float b1, float b2,
                             float eps, float decay, float bc1, float bc2) {
    GRID_STRIDE(i, n) {
        float g = grad[i];
        p[i] *= decay;
        m[i] = b1 * m[i] + (1.0f - b1) * g;
        v[i] = b2 * v[i] + (1.0f - b2) * g * g;
        p[i] -= lr * (m[i] / bc1) / (sqrtf(v[i] / bc2) + eps);
    }
}

static int adamw_update(qlc_stream s, float *p, float *m, float *v, const float *grad, int64_t n, float lr, float b1,
                        float b2, float eps, float wd, int64_t step) {
    if (n < 0 || step < 1) return qlc_fail(QLC_EINVAL, "adamw_update: n %lld, step %lld", (long long)n, (long long)step);
    if (n == 0) return QLC_OK;
    float bc1 = 1.0f - powf(b1, (float)step), bc2 = 1.0f - powf(b2, (float)step);
    adamw_kernel<<<grid(n), 256, 0, as_stream(s)>>>(p, m, v, grad, n, lr, b1, b2, eps, 1.0f - lr * wd, bc1, bc2);
    return qlc_check_launch("adamw_update");
}

void qlc_fill_elementwise(qlc_api *api) {
    api->unary_fwd = unary_fwd;
    api->unary_bwd = unary_bwd;
    api->binary_strided = binary_strided;
    api->axpy = axpy;
    api->scale_shift = scale_shift;
    api->softmax_rows = softmax_rows;
    api->sgd_update = sgd_update;
    api->adamw_update = adamw_update;
}
