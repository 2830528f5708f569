import CKernels

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

    /// One line for logs and provenance, e.g. "avx2 kernels (supported: ref, avx2), 2 threads".
    public static var summary: String {
        let supported = ISA.allCases.filter(\.isSupported).map(\.description).joined(separator: ", ")
        return "\(isa) kernels (supported: \(supported)), \(threads) threads"
    }
}
