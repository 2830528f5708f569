/* probe.c — opens the plugin the way the Swift Device layer does and reports the device.
 * Built and run by scripts/build_cuda.sh; prints one line and exits 0 either way. */
#include <dlfcn.h>
#include <stdio.h>
#include "qlcuda.h"

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : ".build/cuda/libqlcuda.so";
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) { printf("✗ plugin: cannot open %s (%s)\n", path, dlerror()); return 1; }
    qlc_get_api_fn get = (qlc_get_api_fn)dlsym(lib, "qlc_get_api");
    const qlc_api *api = get ? get(QLC_ABI_VERSION) : NULL;
    if (!api) { printf("✗ plugin: %s has no qlc_get_api for ABI %d\n", path, QLC_ABI_VERSION); return 1; }
    qlc_device_info info;
    int st = api->device_info(&info);
    if (st == QLC_OK)
        printf("✓ device: %s, %d SMs, sm_%d%d, %.1f GiB\n", info.name, info.sm_count, info.cc_major, info.cc_minor,
               info.total_memory / 1073741824.0);
    else
        printf("✗ device: %s (plugin loaded fine; kernels run when a GPU is present)\n", api->last_error());
    return 0;
}
