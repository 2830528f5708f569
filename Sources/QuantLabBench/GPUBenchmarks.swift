import CQLCuda
import Foundation
import QuantLabCore

/// `qlab bench --gpu`: our CUDA GEMMs against cuBLAS on the same device in the same run, as
/// ratios (issue #21). Every kernel is timed with CUDA events around `reps` back-to-back calls
/// (best of three rounds, each at least ~50 ms), after a warm-up call. Before timing, each of
/// our results is compared with cuBLAS's on the same inputs, so a fast wrong kernel cannot
/// post a rate: FP32 within 1e-4 relative (summation order differs), INT8 exactly (A's codes
/// are 0...127 there, so u8 and s8 read the same numbers).
public struct GPUBenchmarks {
    public var sizes = [512, 1024, 2048, 4096, 8192]
    public var quick = false
    public var log: (String) -> Void = { print($0) }

    public init() {}

    public struct Row: Codable, Sendable {
        public var n: Int
        /// TFLOP/s (FP32) and TOP/s (INT8) by kernel name; "cublas" is the peer.
        public var fp32: [String: Double]
        public var int8: [String: Double]
        public var fp32Ratio: Double? { fp32["cublas"].flatMap { peer in fp32["reg128"].map { $0 / peer } } }
        public var int8Ratio: Double? { int8["cublas"].flatMap { peer in int8["imma"].map { $0 / peer } } }
    }

    /// Milliseconds per call of `body` (which enqueues one kernel on the default stream).
    func milliseconds(_ api: qlc_api, _ body: () throws -> Void) throws -> Double {
        var start: qlc_event?, stop: qlc_event?
        try CUDA.shared.check(api.event_create(&start), "event")
        try CUDA.shared.check(api.event_create(&stop), "event")
        defer { _ = api.event_destroy(start); _ = api.event_destroy(stop) }
        func round(_ reps: Int) throws -> Double {
            try CUDA.shared.check(api.event_record(start, nil), "event record")
            for _ in 0..<reps { try body() }
            try CUDA.shared.check(api.event_record(stop, nil), "event record")
            var ms: Float = 0
            try CUDA.shared.check(api.event_elapsed_ms(&ms, start, stop), "event elapsed")
            return Double(ms) / Double(reps)
        }
        let first = try round(1) // warm-up (and module load)
        let reps = max(1, min(200, Int((quick ? 20 : 50) / max(first, 1e-3))))
        var best = Double.infinity
        for _ in 0..<(quick ? 2 : 3) { best = min(best, try round(reps)) }
        return best
    }

    /// A rate, or a ratio, as the tables print them ("-" when not measured).
    func f(_ v: Double?) -> String { v.map { String(format: "%.1f", $0) } ?? "-" }
    func r(_ v: Double?) -> String { v.map { String(format: "%.2f", $0) } ?? "-" }

    public func run() throws -> (rows: [Row], summary: [String]) {
        let cuda = CUDA.shared
        let api = try cuda.requireDevice()
        let cc = cuda.computeCapability ?? 0
        var peerText = [CChar](repeating: 0, count: 512)
        let hasPeer = api.cublas_open(&peerText, Int32(peerText.count)) == QLC_OK
        let peer = String(decoding: peerText.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        log("device: \(cuda.notice)")
        log("peer: \(peer)")
        var rows: [Row] = []
        let sgemmKernels: [(Int32, String)] = [(Int32(QLC_SGEMM_TILED), "tiled"), (Int32(QLC_SGEMM_REG128), "reg128")]
        var igemmKernels: [(Int32, String)] = [(Int32(QLC_IGEMM_DP4A), "dp4a")]
        if cc >= 80 { igemmKernels += [(Int32(QLC_IGEMM_IMMA), "imma"), (Int32(QLC_IGEMM_IMMA_WIDE), "imma-wide")] }
        for n in (quick ? [512, 2048] : sizes) {
            let n32 = Int32(n), ops = 2 * pow(Double(n), 3)
            var rng = SeededGenerator(seed: UInt64(n))
            var row = Row(n: n, fp32: [:], int8: [:])
            do { // FP32
                let a = try CUDABuffer((0..<(n * n)).map { _ in rng.nextFloat() - 0.5 })
                let b = try CUDABuffer((0..<(n * n)).map { _ in rng.nextFloat() - 0.5 })
                let c = try CUDABuffer<Float>(count: n * n), ref = try CUDABuffer<Float>(count: n * n)
                let check = n <= 2048 && hasPeer
                if check { try cuda.check(api.cublas_sgemm(nil, n32, n32, n32, a.typed, b.typed, ref.typed), "cublas sgemm") }
                let want = check ? try ref.download() : []
                for (kernel, name) in sgemmKernels {
                    let call = { try cuda.check(api.sgemm_ex(nil, kernel, 0, 0, n32, n32, n32, 1, a.typed, n32, b.typed, n32, 0, c.typed, n32), "sgemm \(name)") }
                    if check {
                        try call()
                        let got = try c.download()
                        let worst = zip(got, want).map { abs($0 - $1) / max(1, abs($1)) }.max() ?? 0
                        guard worst <= 1e-4 else { throw DeviceError("sgemm \(name) n=\(n) differs from cuBLAS by \(worst) (relative)") }
                    }
                    row.fp32[name] = ops / (try milliseconds(api, call) * 1e-3) / 1e12
                }
                if hasPeer {
                    row.fp32["cublas"] = ops / (try milliseconds(api) { try cuda.check(api.cublas_sgemm(nil, n32, n32, n32, a.typed, b.typed, c.typed), "cublas sgemm") } * 1e-3) / 1e12
                }
            }
            do { // INT8: A codes 0...127, weights N x K (cuBLAS's operand) and K x N (ours, packed)
                let aHost = (0..<(n * n)).map { _ in UInt8(truncatingIfNeeded: rng.next()) & 127 }
                let bt = (0..<(n * n)).map { _ in Int8(truncatingIfNeeded: rng.next()) }
                var bHost = [Int8](repeating: 0, count: n * n)
                for j in 0..<n { for k in 0..<n { bHost[k * n + j] = bt[j * n + k] } }
                let a = try CUDABuffer(aHost), dBt = try CUDABuffer(bt), dB = try CUDABuffer(bHost)
                let packed = try CUDABuffer<Int8>(count: api.igemm_packed_size(n32, n32))
                try cuda.check(api.igemm_pack_b(nil, packed.pointer, nil, dB.typed, n32, n32, n32), "pack")
                let c = try CUDABuffer<Int32>(count: n * n), ref = try CUDABuffer<Int32>(count: n * n)
                let check = n <= 2048 && hasPeer
                if check {
                    try cuda.check(api.cublas_igemm(nil, n32, n32, n32, UnsafeRawPointer(a.pointer).assumingMemoryBound(to: Int8.self), dBt.typed, ref.typed), "cublas igemm")
                }
                let want = check ? try ref.download() : []
                for (kernel, name) in igemmKernels {
                    let call = {
                        try cuda.check(api.igemm_ex(nil, kernel, Int32(QLC_OUT_S32), n32, n32, n32, a.typed, n32, packed.pointer, nil, c.pointer, n32), "igemm \(name)")
                    }
                    if check {
                        try call()
                        guard try c.download() == want else { throw DeviceError("igemm \(name) n=\(n) differs from cuBLAS") }
                    }
                    row.int8[name] = ops / (try milliseconds(api, call) * 1e-3) / 1e12
                }
                if hasPeer {
                    let a8 = UnsafeRawPointer(a.pointer).assumingMemoryBound(to: Int8.self)
                    row.int8["cublas"] = ops / (try milliseconds(api) { try cuda.check(api.cublas_igemm(nil, n32, n32, n32, a8, dBt.typed, c.typed), "cublas igemm") } * 1e-3) / 1e12
                }
            }
            rows.append(row)
            log("n=\(n): FP32 TFLOP/s tiled \(f(row.fp32["tiled"])) reg128 \(f(row.fp32["reg128"])) cuBLAS \(f(row.fp32["cublas"])) -> \(r(row.fp32Ratio))x; "
                + "INT8 TOP/s dp4a \(f(row.int8["dp4a"])) imma \(f(row.int8["imma"])) imma-wide \(f(row.int8["imma-wide"])) cuBLAS \(f(row.int8["cublas"])) -> \(r(row.int8Ratio))x")
        }
        var summary = ["GPU GEMM on \(cuda.notice); peer \(peer)",
                       "| n | SGEMM v2 tiled | SGEMM v3 reg128 | cuBLAS FP32 | v3/cuBLAS | INT8 dp4a | INT8 imma 128x128 | INT8 imma 128x256 | cuBLAS INT8 | imma/cuBLAS |",
                       "|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows {
            summary.append("| \(row.n) | \(f(row.fp32["tiled"])) | \(f(row.fp32["reg128"])) | \(f(row.fp32["cublas"])) | \(r(row.fp32Ratio)) | "
                           + "\(f(row.int8["dp4a"])) | \(f(row.int8["imma"])) | \(f(row.int8["imma-wide"])) | \(f(row.int8["cublas"])) | \(r(row.int8Ratio)) |")
        }
        summary.append("FP32 in TFLOP/s (cuBLAS default math: no TF32), INT8 in TOP/s (ours u8 x s8, cuBLAS s8 x s8, int32 out); targets: INT8 >= 0.8x and SGEMM >= 0.7x cuBLAS at n >= 2048")
        return (rows, summary)
    }
}
