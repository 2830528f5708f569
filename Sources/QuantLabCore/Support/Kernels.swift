import CKernels
import Dispatch
import Foundation

/// The C kernels' run-time settings, for code above the layers that call kernels.
///
/// Only QuantLabCore, QuantLabData, QuantLabQuant (and the benchmarks) call C directly; models,
/// reports, the command-line tool and the experiments reach kernels through tensor ops and this
/// type. `QL_ISA=ref|avx2|avx512` caps the SIMD level and `QL_NUM_THREADS` the thread count.
public enum Kernels {
    /// A SIMD level of the C kernels, from the scalar reference (the specification) up.
    public enum ISA: Int, CaseIterable, Sendable, CustomStringConvertible {
        case reference = 0, avx2 = 1, avx512 = 2

        var c: ql_isa { ql_isa(rawValue: UInt32(rawValue)) }
        /// The name the kernels print ("ref", "avx2", "avx512").
        public var description: String { String(cString: ql_isa_name(c)) }
        /// Whether this CPU (and OS) supports the level.
        public var isSupported: Bool { ql_isa_supported(c) != 0 }
    }

    /// The level every kernel uses: the fastest supported one, capped by `QL_ISA`.
    public static var isa: ISA { ISA(rawValue: Int(ql_isa_best().rawValue)) ?? .reference }

    /// Worker threads of the kernels' pool (`QL_NUM_THREADS`, default: the core count).
    public static var threads: Int {
        get { Int(ql_get_num_threads()) }
        set { ql_set_num_threads(Int32(newValue)) }
    }

    /// Runs `body` with this thread's kernels serial (the pool is not used from this thread
    /// meanwhile): for callers that run their own threads, e.g. one engine instance per thread.
    public static func serially<T>(_ body: () throws -> T) rethrows -> T {
        ql_set_thread_serial(1)
        defer { ql_set_thread_serial(0) }
        return try body()
    }

    /// One core's peak multiply-add rates at a SIMD level, measured with the instructions the
    /// kernels use (FP32: `vfmadd231ps`; INT8: `vpmaddubsw` + `vpmaddwd` on AVX2, `vpdpbusd` on
    /// AVX-512 VNNI). `int8 / fp32` bounds what INT8 can gain over FP32 per multiply on this
    /// CPU, before algorithms (Winograd) and memory traffic: the ceiling an engine's INT8 / FP32
    /// ratio is read against.
    public struct PeakRates: Sendable {
        public var isa: ISA
        /// Multiply-adds per second on one core.
        public var fp32: Double, int8: Double
        public var int8OverFP32: Double { int8 / fp32 }
        /// e.g. "avx2 peak per core: FP32 21.5 GMAC/s (vfmadd231ps), INT8 19.9 GMAC/s (vpmaddubsw + vpmaddwd): INT8 / FP32 at most 0.93x per multiply".
        public var summary: String {
            let int8Instr = isa == .avx512 ? "vpdpbusd" : "vpmaddubsw + vpmaddwd"
            return String(format: "%@ peak per core: FP32 %.1f GMAC/s (vfmadd231ps), INT8 %.1f GMAC/s (%@): INT8 / FP32 at most %.2fx per multiply",
                          isa.description, fp32 / 1e9, int8 / 1e9, int8Instr, int8OverFP32)
        }
    }

    /// Measures `PeakRates` on the calling thread: each probe about `seconds` long, best of
    /// `rounds` (FP32 and INT8 interleaved, so a slower moment of the machine hits both). Nil for
    /// the scalar reference level or a level this CPU lacks. Throws if a probe's result differs
    /// from its closed form (the instructions did not compute what they should).
    public static func peakRates(isa: ISA = Kernels.isa, seconds: Double = 0.05, rounds: Int = 3) throws -> PeakRates? {
        guard isa != .reference, isa.isSupported else { return nil }
        func probe(_ kind: Int32, _ iters: Int) throws -> (macs: Double, seconds: Double) {
            var macs = 0.0, check: UInt32 = 0
            let clock = Stopwatch()
            let status = ql_peak_probe(isa.c, kind, iters, &macs, &check)
            let elapsed = clock.seconds
            guard Int(status) == QL_OK else { throw TensorError.kernelFailed("ql_peak_probe", status) }
            let expected = ql_peak_expected(isa.c, kind, iters)
            guard check == expected else {
                throw TensorError.kernelFailed("ql_peak_probe (\(isa), kind \(kind)): result \(check) where the closed form gives \(expected)", Int32(QL_EINVAL))
            }
            return (macs, elapsed)
        }
        var best = [0.0, 0.0]
        var iters = [100_000, 100_000]
        for _ in 0..<max(rounds, 1) {
            for (i, kind) in [Int32(QL_PEAK_FP32), Int32(QL_PEAK_INT8)].enumerated() {
                var r = try probe(kind, iters[i])
                if r.seconds < seconds / 4 { // too short to time: scale to the target length
                    iters[i] = Int(Double(iters[i]) * seconds / max(r.seconds, 1e-6))
                    r = try probe(kind, iters[i])
                }
                best[i] = max(best[i], r.macs / r.seconds)
            }
        }
        return PeakRates(isa: isa, fp32: best[0], int8: best[1])
    }

    /// The CPU as the OS names it, with its x86 family and model, which tell generations apart
    /// where the name does not (a cloud VM's "AMD EPYC" is Zen 1 at family 23 model 1, Zen 2 at
    /// family 23 model 49, Zen 3 at family 25): e.g. "AMD EPYC (family 23 model 1)". From
    /// /proc/cpuinfo; "unknown" where there is none. Speed figures compare only on the same one.
    public static let cpuName: String = {
        guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else { return "unknown" }
        func field(_ key: String) -> String? {
            for line in info.split(separator: "\n") { // the first processor's lines come first
                let parts = line.split(separator: ":", maxSplits: 1)
                if parts.count == 2, parts[0].trimmingCharacters(in: .whitespaces) == key {
                    return parts[1].trimmingCharacters(in: .whitespaces)
                }
            }
            return nil
        }
        let name = field("model name") ?? "unknown"
        guard let family = field("cpu family"), let model = field("model") else { return name }
        return "\(name) (family \(family) model \(model))"
    }()

    /// One line for logs and provenance, e.g. "avx2 kernels (supported: ref, avx2), 2 threads".
    public static var summary: String {
        let supported = ISA.allCases.filter(\.isSupported).map(\.description).joined(separator: ", ")
        return "\(isa) kernels (supported: \(supported)), \(threads) threads"
    }
}
