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
/* Job fields are atomics: a worker that wakes late may still read them while the next job is
 * being posted. next_task is set to TASKS_CLOSED once a job is complete, so such a worker
 * claims nothing of the old job; if it claims a task of the new job, it reads that job's
 * fields, which were stored before next_task was reset to 0. */
#define TASKS_CLOSED (1 << 29)
static _Atomic int job_ntasks = 0;
static _Atomic(ql_task_fn) job_fn = NULL;
static _Atomic(void *) job_ctx = NULL;
static _Atomic int next_task = TASKS_CLOSED;
static _Thread_local int in_task = 0;
static _Thread_local int serial_thread = 0; /* ql_set_thread_serial */

static void run_tasks(void) {
    int t;
    in_task = 1;
    while ((t = atomic_fetch_add(&next_task, 1)) < atomic_load(&job_ntasks)) {
        atomic_load(&job_fn)(t, atomic_load(&job_ctx));
        atomic_fetch_add(&tasks_done, 1);
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
    if (ntasks == 1 || in_task || serial_thread || n_threads == 1) {
        for (int t = 0; t < ntasks; t++) fn(t, ctx);
        return;
    }
    pthread_mutex_lock(&pool_lock);
    int helpers = ql_min_i(n_threads, ntasks) - 1;
    ensure_workers(helpers);
    helpers = ql_min_i(helpers, n_workers);
    atomic_store(&job_fn, fn);
    atomic_store(&job_ctx, ctx);
    atomic_store(&job_ntasks, ntasks);
    atomic_store(&tasks_done, 0);
    atomic_store(&next_task, 0);
    atomic_store(&active_workers, helpers);
    pthread_mutex_lock(&wake_lock);
    atomic_fetch_add(&generation, 1);
    pthread_cond_broadcast(&wake_cond);
    pthread_mutex_unlock(&wake_lock);
    run_tasks();
    while (atomic_load(&tasks_done) < ntasks) __builtin_ia32_pause();
    atomic_store(&next_task, TASKS_CLOSED);
    pthread_mutex_unlock(&pool_lock);
}

void ql_set_thread_serial(int serial) { serial_thread = serial != 0; }
