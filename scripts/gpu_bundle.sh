#!/usr/bin/env bash
# Packs what the GPU suite and GPU runs need on a CUDA machine that has a driver but no Swift:
# the test binary, qlab, the CUDA plugin, and every shared library they load that is not part
# of the base system (the Swift runtime, Foundation, swift-testing, libjpeg), with a run
# script. Output: .build/gpu-bundle.tar.xz (issue #21).
#
# On the CUDA machine:
#   tar xJf gpu-bundle.tar.xz && gpu-bundle/run.sh test        # the GPU conformance suite
#   gpu-bundle/run.sh test "Engine"                            # any other suite, by name
#   gpu-bundle/run.sh bench                                    # qlab bench --gpu: our GEMMs vs cuBLAS
#   gpu-bundle/run.sh qlab info                                # qlab, with the plugin found
#   gpu-bundle/run.sh all OUT                                  # all of it, each command's output a file in OUT
set -euo pipefail
cd "$(dirname "$0")/.."
out=.build/gpu-bundle
[ -f .build/cuda/libqlcuda.so ] || { echo "no .build/cuda/libqlcuda.so: run make cuda first"; exit 2; }
build() { # quiet when it works, the compiler's output when it does not (swift build errors go to stdout)
  local log; log=$(mktemp)
  if ! swift build "$@" --explicit-target-dependency-import-check error > "$log" 2>&1; then cat "$log"; rm -f "$log"; exit 1; fi
  rm -f "$log"
}
build --build-tests
build -c release --product qlab
rm -rf "$out" && mkdir -p "$out/lib"
cp .build/debug/QuantLabPackageTests.xctest .build/release/qlab .build/cuda/libqlcuda.so "$out/"
# every library the binaries load, but the C runtime every Linux has
for bin in "$out/QuantLabPackageTests.xctest" "$out/qlab"; do
  ldd "$bin" | awk '/=> \// { print $3 }' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libgcc_s.so*|libstdc++.so*) ;;
      *) cp -L -n "$lib" "$out/lib/" ;;
    esac
  done
done
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# run.sh test [suite filter] | run.sh bench [qlab bench flags] | run.sh qlab <arguments> | run.sh all OUT
here=$(cd "$(dirname "$0")" && pwd)
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" QL_CUDA_PLUGIN="$here/libqlcuda.so"
# cuBLAS (the GPU bench's peer): the system's, or a pip wheel's (PyTorch ships one)
if [ -z "${QL_CUBLAS:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so'; then
  for py in python3 python; do
    lib=$("$py" -c 'import glob, os, nvidia; print(next(iter(sorted(f for p in nvidia.__path__ for f in glob.glob(os.path.join(p, "*", "lib", "libcublas.so.*")))), ""))' 2>/dev/null) || continue
    [ -n "$lib" ] && { export QL_CUBLAS="$lib"; break; }
  done
fi
case "${1:-test}" in
  test) exec "$here/QuantLabPackageTests.xctest" --testing-library swift-testing --filter "${2:-CUDA|GPU}" ;;
  bench) shift; exec "$here/qlab" bench --gpu "$@" ;;
  qlab) shift; exec "$here/qlab" "$@" ;;
  all) # what a session lent a GPU for a few minutes should run, in order of value; one file per command in OUT
    out=${2:?usage: run.sh all OUT}; mkdir -p "$out"
    { nvidia-smi; lscpu; } > "$out/machine.txt" 2>&1
    "$here/qlab" info > "$out/info.txt" 2>&1
    run() { local name=$1 limit=$2; shift 2; timeout "$limit" "$@" > "$out/$name.txt" 2>&1; echo "exit $?" >> "$out/$name.txt"; }
    run gpu-tests 300 "$here/QuantLabPackageTests.xctest" --testing-library swift-testing --filter "CUDA|GPU"
    run bench-gpu 300 "$here/qlab" bench --gpu --json "$out/bench-gpu.json"
    run bench-engine 400 "$here/qlab" bench --engine
    run all-tests 600 "$here/QuantLabPackageTests.xctest" --testing-library swift-testing
    grep -h -E "passed after|failed after|exit [0-9]+$" "$out"/gpu-tests.txt "$out"/all-tests.txt | grep -E "Test run|exit" ;;
  *) echo "usage: run.sh test [filter] | run.sh bench [--quick] [--json FILE] | run.sh qlab <arguments> | run.sh all OUT"; exit 2 ;;
esac
RUN
chmod +x "$out/run.sh"
tar -C .build -cJf .build/gpu-bundle.tar.xz gpu-bundle
echo "✓ .build/gpu-bundle.tar.xz ($(du -h .build/gpu-bundle.tar.xz | cut -f1)): $(ls "$out/lib" | wc -l) libraries; on the GPU machine: tar xJf gpu-bundle.tar.xz && gpu-bundle/run.sh test"
