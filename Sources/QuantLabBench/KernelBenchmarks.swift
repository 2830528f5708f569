import CKernels
import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

/// Wall-clock timing: the best of several rounds, each long enough to swamp timer noise.
/// Best-of (not mean) because on a shared VM slowdowns come from outside the code.
public func bestSeconds(minRoundSeconds: Double = 0.15, rounds: Int = 5, _ body: () -> Void) -> Double {
    body() // warm-up: page faults, thread start, packing buffers
    var best = Double.infinity
    for _ in 0..<rounds {
        var reps = 0
        let clock = Stopwatch()
        var elapsed = 0.0
        repeat {
            body()
            reps += 1
            elapsed = clock.seconds
        } while elapsed < minRoundSeconds
        best = min(best, elapsed / Double(reps))
    }
    return best
}

/// The kernel benchmarks of `make bench`: every figure is a ratio of two rates measured in
/// the same run on the same machine, so it means something on another machine too.
public struct KernelBenchmarks {
    public var sizes = [256, 512, 1024, 2048]
    public var quick = false
    public var pythonPath: String?
    public var log: (String) -> Void = { print($0) }

    public init() {}

    /// SGEMM GFLOP/s for n x n x n.
    public func sgemmRate(_ n: Int) -> Double {
        var rng = SeededGenerator(seed: UInt64(n))
        let a = (0..<(n * n)).map { _ in rng.nextFloat() - 0.5 }, b = (0..<(n * n)).map { _ in rng.nextFloat() - 0.5 }
        var c = [Float](repeating: 0, count: n * n)
        let t = bestSeconds(rounds: quick ? 2 : 5) {
            _ = ql_sgemm(0, 0, Int32(n), Int32(n), Int32(n), 1, a, Int32(n), b, Int32(n), 0, &c, Int32(n))
        }
        return 2 * pow(Double(n), 3) / t / 1e9
    }

    /// INT8 GEMM (u8 x s8 -> s32, weights pre-packed) GOPS for n x n x n, and the same with
    /// the fused requantization epilogue (s8 out), as the INT8 engine calls it. `activationMax`
    /// 127 gives the codes of a post-ReLU tensor quantized symmetrically (on AVX2 the
    /// vpmaddubsw path), 255 full-range u8 (the sign-extend path).
    public func igemmRate(_ n: Int, activationMax: UInt8 = 255) -> (gops: Double, withEpilogue: Double) {
        var rng = SeededGenerator(seed: UInt64(n) + 1)
        let a = (0..<(n * n)).map { _ in UInt8(truncatingIfNeeded: rng.next()) & activationMax }
        let b = (0..<(n * n)).map { _ in Int8(truncatingIfNeeded: rng.next()) }
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(n), Int32(n)))
        var colSum = [Int32](repeating: 0, count: n)
        _ = ql_igemm_pack_b(&packed, &colSum, b, Int32(n), Int32(n), Int32(n))
        var acc = [Int32](repeating: 0, count: n * n)
        var out = [Int8](repeating: 0, count: n * n)
        let scale = [Float](repeating: 1e-4, count: n)
        let t = bestSeconds(rounds: quick ? 2 : 5) {
            _ = ql_igemm_u8s8s32(Int32(n), Int32(n), Int32(n), a, Int32(n), packed, &acc, Int32(n))
        }
        let offsets = colSum.map { -128 * $0 }
        let t2 = offsets.withUnsafeBufferPointer { off in
            scale.withUnsafeBufferPointer { sc in
                var ep = ql_requant_params(col_offset: off.baseAddress, scale: sc.baseAddress, bias: nil, relu: 0)
                return bestSeconds(rounds: quick ? 2 : 5) {
                    _ = ql_igemm_u8s8_s8(Int32(n), Int32(n), Int32(n), a, Int32(n), packed, &ep, &out, Int32(n))
                }
            }
        }
        let ops = 2 * pow(Double(n), 3)
        return (ops / t / 1e9, ops / t2 / 1e9)
    }

    /// conv2d forward, and backward (data + weight), GFLOP/s for a 3x3 conv.
    public func convRates(batch: Int = 16, channels: Int = 64, size: Int = 40) -> (forward: Double, backward: Double) {
        var rng = SeededGenerator(seed: 7)
        let x = Tensor.randn([batch, channels, size, size], rng: &rng)
        let w = Tensor.randn([channels, channels, 3, 3], std: 0.05, rng: &rng)
        let y = Tensor(zeros: [batch, channels, size, size])
        let dx = Tensor(zeros: x.shape), dw = Tensor(zeros: w.shape)
        var g = ql_conv_geom(N: Int32(batch), C: Int32(channels), H: Int32(size), W: Int32(size), K: Int32(channels),
                             KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1)
        let flops = 2.0 * Double(batch * channels * channels * 9 * size * size)
        let tf = bestSeconds(rounds: quick ? 2 : 5) { _ = ql_conv2d_fwd(y.data, x.data, w.data, nil, &g) }
        let tb = bestSeconds(rounds: quick ? 2 : 5) {
            _ = ql_conv2d_bwd_data(dx.data, y.data, w.data, &g)
            _ = ql_conv2d_bwd_weight(dw.data, nil, y.data, x.data, &g)
        }
        return (flops / tf / 1e9, 2 * flops / tb / 1e9)
    }

    /// The INT8 engine's two routes for one 3x3 conv on post-ReLU codes (NHWC, 0..127), GOPS
    /// with the requantizing epilogue: the direct kernel (iconv.c) and im2col + the packed
    /// GEMM (on AVX-512: the direct kernel's AVX2 code against the VNNI GEMM). `direct` is nil
    /// where the direct kernel declines.
    public func int8ConvRates(batch: Int, inChannels c: Int, outChannels k: Int, size: Int, stride: Int) -> (direct: Double?, im2col: Double) {
        var rng = SeededGenerator(seed: UInt64(c * 1000 + size))
        var g = ql_conv_geom(N: Int32(batch), C: Int32(c), H: Int32(size), W: Int32(size), K: Int32(k), KH: 3, KW: 3,
                             SH: Int32(stride), SW: Int32(stride), PH: 1, PW: 1, DH: 1, DW: 1, groups: 1)
        var oh: Int32 = 0, ow: Int32 = 0
        _ = ql_conv_out_size(&g, &oh, &ow)
        let m = batch * Int(oh) * Int(ow), depth = 9 * c
        let x = (0..<(batch * size * size * c)).map { _ in Int8(rng.next() % 128) }
        let b = (0..<(depth * k)).map { _ in Int8(Int(rng.next() % 255) - 127) }
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(depth), Int32(k)))
        _ = ql_igemm_pack_b(&packed, nil, b, Int32(k), Int32(depth), Int32(k))
        var out = [Int8](repeating: 0, count: m * k), col = [UInt8](repeating: 0, count: m * depth)
        let scale = [Float](repeating: 1e-3, count: k), ops = 2 * Double(m) * Double(depth) * Double(k)
        return scale.withUnsafeBufferPointer { sc in
            var ep = ql_requant_params(col_offset: nil, scale: sc.baseAddress, bias: nil, relu: 1)
            let direct: Double? = ql_iconv_nhwc_s8_isa(QL_ISA_BEST, &g, x, packed, &ep, &out) != 0 ? nil
                : ops / bestSeconds(rounds: quick ? 2 : 5) { _ = ql_iconv_nhwc_s8_isa(QL_ISA_BEST, &g, x, packed, &ep, &out) } / 1e9
            let t = bestSeconds(rounds: quick ? 2 : 5) {
                _ = ql_im2col_nhwc_s8u8(&col, x, &g, 0)
                _ = ql_igemm_u8s8_s8(Int32(m), Int32(k), Int32(depth), col, Int32(depth), packed, &ep, &out, Int32(k))
            }
            return (direct, ops / t / 1e9)
        }
    }

    /// numpy's `a @ b` (OpenBLAS SGEMM) GFLOP/s for each size, measured in a child process
    /// with the same thread count. The machine-wide OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
    /// overrides (set for old OpenBLAS builds) slow a current one, so they are unset for
    /// this comparison only.
    public func numpyRates(_ sizes: [Int], threads: Int) -> [Int: Double]? {
        guard let python = pythonPath else { return nil }
        let script = """
        import sys, time, json
        import numpy as np
        out = {}
        for n in map(int, sys.argv[1:]):
            rng = np.random.default_rng(n)
            a = rng.random((n, n), dtype=np.float32) - 0.5; b = rng.random((n, n), dtype=np.float32) - 0.5
            a @ b
            best = float("inf")
            for _ in range(\(quick ? 2 : 5)):
                reps, t0 = 0, time.perf_counter()
                while True:
                    a @ b; reps += 1
                    el = time.perf_counter() - t0
                    if el >= 0.15: break
                best = min(best, el / reps)
            out[n] = 2 * n**3 / best / 1e9
        print(json.dumps({"rates": out, "numpy": np.__version__}))
        """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = ["-c", script] + sizes.map(String.init)
        var env = ProcessInfo.processInfo.environment
        env["OPENBLAS_CORETYPE"] = nil
        env["OPENBLAS_L2_SIZE"] = nil
        env["OPENBLAS_NUM_THREADS"] = String(threads)
        env["OMP_NUM_THREADS"] = String(threads)
        p.environment = env
        let pipe = Pipe()
        p.standardOutput = pipe
        do { try p.run() } catch {
            log("numpy comparison skipped: cannot run \(python) (\(error.localizedDescription))")
            return nil
        }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0,
              let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
              let rates = obj["rates"] as? [String: Double] else {
            log("numpy comparison skipped: \(python) with numpy did not answer (install it with `make venv`)")
            return nil
        }
        log("numpy \(obj["numpy"] ?? "?") (OpenBLAS), \(threads) threads, OPENBLAS_CORETYPE unset")
        return Dictionary(uniqueKeysWithValues: rates.compactMap { k, v in Int(k).map { ($0, v) } })
    }

    /// Training throughput of the YOLOv6-N-like detector (RepVGG blocks, 160 px, batch 32):
    /// images/s of full steps (forward, assignment + loss, backward, SGD update) and the
    /// effective GFLOP/s (3 x forward FLOPs per image), on random images with random boxes.
    public func detectorTrainingRate(steps: Int = 5, batch: Int = 32) -> (imagesPerSecond: Double, effectiveGFLOPs: Double) {
        var bench = TrainingBenchmark()
        bench.batch = batch
        let w = bench.workload()
        let step = bench.trainingStep(w)
        let seconds = TrainingBenchmark.time(warmup: 1, steps: steps) { _ = step() }.reduce(0, +)
        let forwardFLOPs = FLOPCounter.count { _ = withNoGrad { w.model(Tensor(zeros: [1, 3, bench.inputSize, bench.inputSize])) } }
        let rate = Double(steps * batch) / seconds
        return (rate, 3 * forwardFLOPs * rate / 1e9)
    }

    /// Runs everything and returns the summary lines (`name: ratio` per target).
    public func run() -> [String] {
        let threads = Int(ql_get_num_threads())
        log("cpu: \(Kernels.cpuName); \(String(cString: ql_isa_name(QL_ISA_BEST))) kernels, \(threads) threads")
        var summary: [String] = []
        do { // the ceiling the INT8 / FP32 ratios below are read against
            if let peak = try Kernels.peakRates() {
                log("  " + peak.summary)
                summary.append(String(format: "peak int8/fp32 per multiply: %.2fx", peak.int8OverFP32))
            }
        } catch {
            log("  peak probe failed: \(error)") // a wrong closed form: say so, then the GEMM benchmarks
        }
        let sizes = quick ? [256, 1024] : self.sizes
        var ours: [Int: Double] = [:]
        for n in sizes {
            ours[n] = sgemmRate(n)
            log(String(format: "  sgemm %4d: %6.1f GFLOP/s", n, ours[n]!))
        }
        let theirs = numpyRates(sizes, threads: threads) ?? [:]
        // measure ours again after numpy and keep the better, so drift on the VM during the
        // comparison does not favour either side
        for n in sizes { ours[n] = max(ours[n]!, sgemmRate(n)) }
        for n in sizes {
            if let t = theirs[n] {
                log(String(format: "  sgemm %4d: ours %6.1f, numpy/OpenBLAS %6.1f GFLOP/s", n, ours[n]!, t))
                summary.append(String(format: "sgemm %d: %.2fx openblas", n, ours[n]! / t))
            }
        }
        let n8 = quick ? 1024 : 2048
        for n in Set([1024, n8]).sorted() {
            let fp32 = ours[n] ?? sgemmRate(n)
            for (label, amax) in [("post-ReLU codes 0..127", UInt8(127)), ("full-range u8", UInt8(255))] {
                let (gops, withEpi) = igemmRate(n, activationMax: amax)
                log(String(format: "  int8 gemm %4d, %@: %6.1f GOPS (%6.1f fused with requantization), fp32 %6.1f GFLOP/s", n, label, gops, withEpi, fp32))
                summary.append(String(format: "int8 gemm %d, %@: %.2fx our sgemm (%.2fx fused with requantization)", n, label, gops / fp32, withEpi / fp32))
            }
        }
        // the INT8 engine's conv routes on the detector's 3x3 shapes (batch 32, 160 px input)
        let shapes = quick ? [(16, 32, 80, 2), (128, 128, 10, 1)]
            : [(16, 32, 80, 2), (32, 32, 40, 1), (64, 64, 20, 1), (128, 128, 10, 1), (256, 256, 5, 1)]
        for (c, k, size, stride) in shapes {
            let (direct, im2col) = int8ConvRates(batch: 32, inChannels: c, outChannels: k, size: size, stride: stride)
            let label = String(format: "int8 conv 3x3 %d->%d %dx%d stride %d batch 32", c, k, size, size, stride)
            if let direct {
                log(String(format: "  %@: direct %6.1f GOPS, im2col + GEMM %6.1f GOPS", label, direct, im2col))
                summary.append(String(format: "%@: direct %.2fx im2col + GEMM", label, direct / im2col))
            } else {
                log(String(format: "  %@: im2col + GEMM %6.1f GOPS (the direct kernel declined)", label, im2col))
            }
        }
        let (fwd, bwd) = convRates()
        let ref = ours[1024] ?? sgemmRate(1024)
        log(String(format: "  conv2d 3x3 64->64 40x40 batch 16: forward %6.1f, backward %6.1f GFLOP/s", fwd, bwd))
        summary.append(String(format: "conv2d forward: %.2fx our sgemm 1024 rate", fwd / ref))
        summary.append(String(format: "conv2d backward: %.2fx our sgemm 1024 rate", bwd / ref))
        let (ips, gflops) = detectorTrainingRate(steps: quick ? 2 : 5)
        log(String(format: "  detector training (YOLOv6-N-like, RepVGG, 160 px, batch 32): %.1f img/s, %.0f GFLOP/s effective", ips, gflops))
        summary.append(String(format: "detector training: %.1f img/s (%.0f GFLOP/s effective, %.2fx our sgemm 1024 rate); `make bench-torch` gives the in-run ratio against PyTorch", ips, gflops, gflops / ref))
        return summary
    }
}
