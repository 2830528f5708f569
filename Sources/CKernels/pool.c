/* A persistent pthread pool with one job at a time.
 *
 * Why not Dispatch: on small VMs `concurrentPerform` often runs short chunks serially on the
 * calling thread. Workers here spin briefly on a generation counter before sleeping on a
 * condition variable, so a job posted right after the previous one starts without a wake-up.
 * Tasks are claimed with an atomic counter; the caller takes part and waits for the rest. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#include "internal.h"

#define QL_MAX_THREADS 256

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* serialises job submission */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond = PTHREAD_COND_INITIALIZER;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static int n_threads = 1;        /* threads used per job, caller included */
static int n_workers = 0;        /* worker threads started */
static _Atomic unsigned long generation = 0;
static _Atomic int tasks_done = 0;
static _Atomic int active_workers = 0; /* workers allowed to join the current job */
/* Claiming a task. Job fields are atomics: a worker that wakes late may still read them while
 * the next job is being posted. A plain counter is not enough: a worker that took an index of
 * job A after A's last task was claimed, and was preempted before comparing it with the task
 * count, could compare it with job B's larger count and run "task t" of the wrong job (a task
 * run twice, or A's function on B's context); B's caller then counted a task that was not
 * its own and could return while one of its tasks was still running. So the claim word holds
 * the job's sequence number (high 32 bits) beside the next index (low 32 bits), and a task is
 * taken only by a compare-and-swap of the exact word that was read. A finished job's word is
 * replaced by a closed one (index 0xffffffff) before the next job's fields are written, so a
 * successful swap means the job the word names was still open, and the fields read before it
 * were that job's (they are stored before the word that publishes the job).
 * tests: ql_pool_stress (KernelTests) runs many short jobs of alternating sizes on more
 * threads than cores and counts every task's executions. */
static _Atomic int job_ntasks = 0;
static _Atomic(ql_task_fn) job_fn = NULL;
static _Atomic(void *) job_ctx = NULL;
static _Atomic unsigned long long claim_word = 0;
static unsigned long long job_seq = 0; /* under pool_lock */
static _Thread_local int in_task = 0;
static _Thread_local int serial_thread = 0; /* ql_set_thread_serial */
/* ql_pool_stress's thread count, for the jobs of its own thread only: changing the global count
 * changed, mid-run, how many partial sums the kernels of concurrently running tests made (so
 * their bits), and a test comparing two training runs bit for bit failed now and then. */
static _Thread_local int stress_threads = 0;

static void run_tasks(void) {
    in_task = 1;
    unsigned long long w = atomic_load(&claim_word);
    for (;;) {
        int n = atomic_load(&job_ntasks);
        ql_task_fn fn = atomic_load(&job_fn);
        void *ctx = atomic_load(&job_ctx);
        unsigned int t = (unsigned int)(w & 0xffffffffu);
        if (t >= (unsigned int)n) break;
        /* on failure w is reloaded (another thread took t, or a new job was posted) */
        if (!atomic_compare_exchange_weak(&claim_word, &w, w + 1)) continue;
        fn((int)t, ctx);
        atomic_fetch_add(&tasks_done, 1);
        w = atomic_load(&claim_word);
    }
    in_task = 0;
}

static void *worker_main(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned long seen = 0;
    for (;;) {
        unsigned long g;
        int spins = 0;
        while ((g = atomic_load(&generation)) == seen && spins < 20000) {
            __builtin_ia32_pause();
            spins++;
        }
        if (g == seen) {
            pthread_mutex_lock(&wake_lock);
            while ((g = atomic_load(&generation)) == seen) pthread_cond_wait(&wake_cond, &wake_lock);
            pthread_mutex_unlock(&wake_lock);
        }
        seen = g;
        if (id < atomic_load(&active_workers)) run_tasks();
    }
    return NULL;
}

static void pool_init(void) {
    const char *env = getenv("QL_NUM_THREADS");
    long n = env ? strtol(env, NULL, 10) : sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    if (n > QL_MAX_THREADS) n = QL_MAX_THREADS;
    n_threads = (int)n;
}

static void ensure_workers(int wanted) {
    while (n_workers < wanted) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &attr, worker_main, (void *)(intptr_t)n_workers) != 0) {
            pthread_attr_destroy(&attr);
            break;
        }
        pthread_attr_destroy(&attr);
        n_workers++;
    }
}

void ql_set_num_threads(int n) {
    pthread_once(&pool_once, pool_init);
    pthread_mutex_lock(&pool_lock);
    n_threads = n < 1 ? 1 : (n > QL_MAX_THREADS ? QL_MAX_THREADS : n);
    pthread_mutex_unlock(&pool_lock);
}

int ql_get_num_threads(void) {
    pthread_once(&pool_once, pool_init);
    return n_threads;
}

void ql_parallel_for(int ntasks, ql_task_fn fn, void *ctx) {
    pthread_once(&pool_once, pool_init);
    if (ntasks <= 0) return;
    int threads = stress_threads ? stress_threads : n_threads;
    if (ntasks == 1 || in_task || serial_thread || threads == 1) {
        for (int t = 0; t < ntasks; t++) fn(t, ctx);
        return;
    }
    pthread_mutex_lock(&pool_lock);
    int helpers = ql_min_i(threads, ntasks) - 1;
    ensure_workers(helpers);
    helpers = ql_min_i(helpers, n_workers);
    atomic_store(&job_fn, fn);
    atomic_store(&job_ctx, ctx);
    atomic_store(&job_ntasks, ntasks);
    atomic_store(&tasks_done, 0);
    job_seq++;
    atomic_store(&claim_word, job_seq << 32); /* publishes the job: (seq, next index 0) */
    atomic_store(&active_workers, helpers);
    pthread_mutex_lock(&wake_lock);
    atomic_fetch_add(&generation, 1);
    pthread_cond_broadcast(&wake_cond);
    pthread_mutex_unlock(&wake_lock);
    run_tasks();
    while (atomic_load(&tasks_done) < ntasks) __builtin_ia32_pause();
    /* close the job before the next one's fields are written: a worker holding this job's
     * word (its last index included) now fails its compare-and-swap */
    atomic_store(&claim_word, (job_seq << 32) | 0xffffffffull);
    pthread_mutex_unlock(&pool_lock);
}

void ql_set_thread_serial(int serial) { serial_thread = serial != 0; }

typedef struct { _Atomic int *counts; int n; } stress_job;

static void stress_task(int t, void *p) {
    stress_job *j = p;
    volatile int x = 0;
    for (int i = 0; i < 50; i++) x += i; /* enough work for the tasks of one job to overlap */
    if (t < 0 || t >= j->n) atomic_fetch_add(&j->counts[63], 1000); /* an index the job does not have */
    else atomic_fetch_add(&j->counts[t], 1);
}

long ql_pool_stress(int jobs, int threads) {
    if (jobs < 1) return 0;
    stress_threads = threads < 1 ? 1 : (threads > QL_MAX_THREADS ? QL_MAX_THREADS : threads);
    _Atomic int *arena = calloc((size_t)jobs * 64, sizeof(int));
    stress_job *ctx = calloc((size_t)jobs, sizeof(stress_job));
    if (!arena || !ctx) { free(arena); free(ctx); stress_threads = 0; return -1; }
    static const int sizes[3] = {2, 9, 40};
    for (int j = 0; j < jobs; j++) {
        ctx[j].counts = arena + (size_t)j * 64;
        ctx[j].n = sizes[j % 3];
        ql_parallel_for(ctx[j].n, stress_task, &ctx[j]);
    }
    long bad = 0;
    for (int j = 0; j < jobs; j++)
        for (int t = 0; t < 64; t++) if (atomic_load(&arena[(size_t)j * 64 + t]) != (t < ctx[j].n ? 1 : 0)) bad++;
    free(arena);
    free(ctx);
    stress_threads = 0;
    return bad;
}
