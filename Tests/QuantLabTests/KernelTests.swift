import CKernels
import Foundation
import Testing
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport

/// Every fast kernel against its `_ref` twin, on awkward sizes.
@Suite("C kernels against their references")
struct KernelTests {
    /// The pool once ran a late worker's claimed index against the next job's task count (a
    /// task twice, or one job's function on another's context; exp02b's grid crashed on it
    /// under load). 200,000 short jobs of alternating sizes on 8 threads — more than the cores,
    /// so workers are preempted mid-claim — must run every task of every job exactly once.
    /// Before the fix this found 14-430 bad slots per run on a 2-core VM.
    @Test("the thread pool runs every task of every job exactly once, with workers preempted")
    func poolStress() {
        #expect(ql_pool_stress(200_000, 8) == 0)
    }

    /// The peak probes (peak.c) compute a known value: their accumulators end at a closed form
    /// (the reference), so a wrong instruction, operand order or a loop the compiler shortened
    /// shows. The rates themselves are not checked (a loaded machine gives any value).
    @Test("peak-rate probes: the closed-form result on every fast ISA, the multiply-add count, refusals")
    func peakProbe() throws {
        for isa in supportedISAs where isa != QL_ISA_REF {
            for kind in [Int32(QL_PEAK_FP32), Int32(QL_PEAK_INT8)] {
                for iters in [0, 1, 3, 1_000_003] {
                    var macs = -1.0, check: UInt32 = 0
                    #expect(ql_peak_probe(isa, kind, iters, &macs, &check) == 0)
                    #expect(check == ql_peak_expected(isa, kind, iters), "isa \(isa.rawValue) kind \(kind) iters \(iters)")
                    let lanes = isa == QL_ISA_AVX512 ? 16.0 : 8.0, chains = kind == QL_PEAK_INT8 && isa != QL_ISA_AVX512 ? 6.0 : 10.0
                    #expect(macs == (kind == QL_PEAK_INT8 ? 4 : 2) * chains * lanes * Double(iters))
                }
            }
        }
        var macs = 0.0, check: UInt32 = 0
        #expect(ql_peak_probe(QL_ISA_REF, Int32(QL_PEAK_FP32), 1, &macs, &check) == Int32(QL_EUNSUPPORTED))
        #expect(ql_peak_probe(QL_ISA_BEST, 7, 1, &macs, &check) == Int32(QL_EINVAL))
        #expect(ql_peak_probe(QL_ISA_BEST, Int32(QL_PEAK_INT8), -1, &macs, &check) == Int32(QL_EINVAL))
        if Kernels.isa != .reference { // QL_ISA=ref: no vector level to probe
            let peak = try #require(try Kernels.peakRates(seconds: 0.005, rounds: 1))
            #expect(peak.fp32 > 0 && peak.int8 > 0 && peak.summary.contains("INT8 / FP32"))
        }
        #expect(try Kernels.peakRates(isa: .reference) == nil)
    }

    /// What results record as the machine: the OS's CPU name with its x86 family and model
    /// (a VM's "AMD EPYC" is Zen 1 or Zen 3 only by those), read from the same /proc/cpuinfo.
    @Test("Stopwatch: seconds, and laps that are consecutive pieces of what an outer stopwatch sees")
    func stopwatch() {
        let outer = Stopwatch()
        var inner = Stopwatch()
        var laps: [Double] = []
        for _ in 0..<3 {
            usleep(2000)
            laps.append(inner.lap())
        }
        let total = outer.seconds
        #expect(laps.allSatisfy { $0 >= 0.002 && $0 < 1 }, "each lap spans a 2 ms sleep, in seconds: \(laps)")
        #expect(laps.reduce(0, +) <= total, "the laps lie within the outer stopwatch's \(total) s")
    }

    @Test("the CPU's name carries the first processor's family and model")
    func cpuName() throws {
        guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8) else {
            #expect(Kernels.cpuName == "unknown")
            return
        }
        let lines = info.split(separator: "\n").map { $0.split(separator: ":", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) } }
        func first(_ key: String) -> String? { lines.first { $0.count == 2 && $0[0] == key }?[1] }
        if let name = first("model name"), let family = first("cpu family"), let model = first("model") {
            #expect(Kernels.cpuName == "\(name) (family \(family) model \(model))")
        } else {
            #expect(!Kernels.cpuName.isEmpty)
        }
    }

    static let awkward = [1, 7, 17, 63, 129]

    @Test("SGEMM: every ISA, transpose, alpha/beta and padded leading dims", arguments: [0, 1, 2, 3])
    func sgemmMatchesReference(transposes: Int) throws {
        let (tA, tB) = (Int32(transposes & 1), Int32(transposes >> 1))
        var rng = SeededGenerator(seed: 11 + UInt64(transposes))
        for isa in supportedISAs {
            for (mi, m) in Self.awkward.enumerated() {
                let n = Self.awkward[(mi + 2) % 5], k = Self.awkward[(mi + 3) % 5] + (isa == QL_ISA_REF ? 0 : 513)
                let lda = (tA != 0 ? m : k) + 3, ldb = (tB != 0 ? k : n) + 5, ldc = n + 2
                let a = randomFloats((tA != 0 ? k : m) * lda, &rng), b = randomFloats((tB != 0 ? n : k) * ldb, &rng)
                let c0 = randomFloats(m * ldc, &rng)
                var got = c0, want = c0
                #expect(ql_sgemm_isa(isa, tA, tB, Int32(m), Int32(n), Int32(k), 0.75, a, Int32(lda), b, Int32(ldb), -0.5, &got, Int32(ldc)) == 0)
                #expect(ql_sgemm_ref(tA, tB, Int32(m), Int32(n), Int32(k), 0.75, a, Int32(lda), b, Int32(ldb), -0.5, &want, Int32(ldc)) == 0)
                // contract: |c - ref| <= 1e-5 * K * max|a| * max|b| + 1e-6 * |ref|
                let mismatch = firstMismatch(got, want, atol: 1e-5 * Double(k), rtol: 1e-6)
                #expect(mismatch == nil, "isa \(ql_isa_name(isa).map { String(cString: $0) } ?? "") \(m)x\(n)x\(k) tA \(tA) tB \(tB): \(mismatch ?? "")")
            }
        }
    }

    /// The convolutions pack their weights once per call and reuse them for every image.
    @Test("SGEMM with a pre-packed A: every fast ISA, both transposes, K over one slab, M over one block", arguments: [0, 1, 2, 3])
    func sgemmPackedA(transposes: Int) throws {
        let (tA, tB) = (Int32(transposes & 1), Int32(transposes >> 1))
        var rng = SeededGenerator(seed: 23 + UInt64(transposes))
        for isa in supportedISAs where isa != QL_ISA_REF {
            for (mi, m) in (Self.awkward + [150]).enumerated() {
                let n = Self.awkward[(mi + 2) % 5], k = Self.awkward[(mi + 3) % 5] + 513
                let lda = (tA != 0 ? m : k) + 3, ldb = (tB != 0 ? k : n) + 5, ldc = n + 2
                let a = randomFloats((tA != 0 ? k : m) * lda, &rng), b = randomFloats((tB != 0 ? n : k) * ldb, &rng)
                let c0 = randomFloats(m * ldc, &rng)
                var packed = [Float](repeating: .nan, count: ql_sgemm_packed_a_floats(isa, Int32(m), Int32(k)))
                #expect(packed.count >= m * k)
                #expect(ql_sgemm_pack_a(isa, tA, Int32(m), Int32(k), 0.75, a, Int32(lda), &packed) == 0)
                var got = c0, want = c0
                #expect(ql_sgemm_packed_a_serial(isa, Int32(m), Int32(n), Int32(k), packed, tB, b, Int32(ldb), -0.5, &got, Int32(ldc)) == 0)
                #expect(ql_sgemm_ref(tA, tB, Int32(m), Int32(n), Int32(k), 0.75, a, Int32(lda), b, Int32(ldb), -0.5, &want, Int32(ldc)) == 0)
                let mismatch = firstMismatch(got, want, atol: 1e-5 * Double(k), rtol: 1e-6)
                #expect(mismatch == nil, "isa \(ql_isa_name(isa).map { String(cString: $0) } ?? "") \(m)x\(n)x\(k) tA \(tA) tB \(tB): \(mismatch ?? "")")
            }
        }
        var dummy: Float = 0
        #expect(ql_sgemm_pack_a(QL_ISA_REF, 0, 1, 1, 1, [1], 1, &dummy) == Int32(QL_EINVAL)) // no packed form for the reference
        #expect(ql_sgemm_packed_a_floats(QL_ISA_REF, 4, 4) == 0)
    }

    /// Autograd writes an input's first gradient without zero-filling it (accumulate 0).
    @Test("unary backward written (accumulate 0) over NaN-filled memory equals accumulating into zeros", arguments: [1, 7, 40_000])
    func unaryBackwardInto(n: Int) {
        var rng = SeededGenerator(seed: 31 + UInt64(n))
        let x = randomFloats(n, &rng).map { abs($0) + 0.1 } // positive: log and sqrt are defined
        let dy = randomFloats(n, &rng)
        for raw in 0...9 {
            let op = ql_unary_op(rawValue: UInt32(raw))
            var y = [Float](repeating: 0, count: n)
            ql_unary_fwd(op, &y, x, Int64(n))
            var added = [Float](repeating: 0, count: n), written = [Float](repeating: .nan, count: n)
            ql_unary_bwd(op, &added, dy, x, y, Int64(n))
            ql_unary_bwd_into(op, &written, dy, x, y, Int64(n), 0)
            #expect(written == added, "op \(raw), n \(n)")
            var twice = written
            ql_unary_bwd_into(op, &twice, dy, x, y, Int64(n), 1) // accumulate 1: added on top
            ql_unary_bwd(op, &added, dy, x, y, Int64(n))
            #expect(twice == added, "op \(raw), n \(n), accumulating")
        }
    }

    /// ReLU's backward has its own AVX2 loop (the scalar one branched per element); bit for bit
    /// the scalar definition dx + (x > 0 ? dy : 0), on inputs with zeros, -0, NaN and infinities.
    @Test("ReLU backward equals dx + (x > 0 ? dy : 0) bit for bit, written and accumulated", arguments: [1, 9, 40_003])
    func reluBackwardExact(n: Int) {
        var rng = SeededGenerator(seed: 77 + UInt64(n))
        let specials: [Float] = [0, -0.0, .nan, .infinity, -.infinity, .leastNormalMagnitude / 128] // the last: a subnormal
        func sample() -> Float { rng.next() % 5 == 0 ? specials[Int(rng.next() % 6)] : rng.nextFloat() * 4 - 2 }
        let x = (0..<n).map { _ in sample() }, dy = (0..<n).map { _ in sample() }, start = (0..<n).map { _ in sample() }
        func want(_ base: [Float]?) -> [Float] { (0..<n).map { i in (base?[i] ?? 0) + (x[i] > 0 ? dy[i] : 0) } }
        var written = [Float](repeating: .nan, count: n), accumulated = start
        ql_unary_bwd_into(QL_UNARY_RELU, &written, dy, x, nil, Int64(n), 0)
        ql_unary_bwd_into(QL_UNARY_RELU, &accumulated, dy, x, nil, Int64(n), 1)
        func bits(_ v: [Float]) -> [UInt32] { v.map(\.bitPattern) }
        #expect(bits(written) == bits(want(nil)), "written, n \(n)")
        #expect(bits(accumulated) == bits(want(start)), "accumulated, n \(n)")
    }

    /// Dense binary ops and max pooling split their work between the threads above a size:
    /// the results must be those of the per-element definition (binary ops, over several
    /// chunks and a ragged end) and of pooling each plane on its own (max pooling).
    @Test("binary ops on dense operands and max pooling, split between threads, equal their definitions")
    func splitElementwiseExact() {
        var rng = SeededGenerator(seed: 404)
        let n = 3 * 32_768 + 77
        let a = randomFloats(n, &rng), b = randomFloats(n, &rng)
        let k = Int64(n / 21), shape: [Int64] = [3, 7, k, 1], strides: [Int64] = [7 * k, k, 1, 1] // dense, a size-1 dim last
        let m = Int(shape.reduce(1, *))
        for (op, f) in [(QL_BINARY_ADD, { (x: Float, y: Float) in x + y }), (QL_BINARY_MUL, { $0 * $1 }), (QL_BINARY_SUB, { $0 - $1 })] {
            var out = [Float](repeating: .nan, count: m)
            #expect(ql_binary_strided(op, &out, a, strides, b, strides, shape, 4) == 0)
            #expect(out == (0..<m).map { f(a[$0], b[$0]) }, "op \(op.rawValue)")
        }
        let (planes, h, w) = (24, 20, 20)
        let x = randomFloats(planes * h * w, &rng)
        var y = [Float](repeating: .nan, count: planes * h * w), arg = [Int32](repeating: -9, count: planes * h * w)
        ql_max_pool2d_fwd(&y, &arg, x, Int64(planes), Int32(h), Int32(w), 5, 5, 1, 1, 2, 2)
        for p in 0..<planes {
            var yp = [Float](repeating: .nan, count: h * w), ap = [Int32](repeating: -9, count: h * w)
            ql_max_pool2d_fwd(&yp, &ap, Array(x[(p * h * w)..<((p + 1) * h * w)]), 1, Int32(h), Int32(w), 5, 5, 1, 1, 2, 2)
            #expect(Array(y[(p * h * w)..<((p + 1) * h * w)]) == yp && Array(arg[(p * h * w)..<((p + 1) * h * w)]) == ap, "plane \(p)")
        }
    }

    /// Without indices max pooling takes a separable loop (rows, then columns): the values must
    /// be the indexed loop's bits for any window, stride and padding, with NaN and infinities
    /// in the input, and each the element its index names.
    @Test("max pooling without indices (separable) gives the indexed loop's values; the indices name them", arguments: Array(0..<6))
    func maxPoolSeparable(index: Int) {
        let cases: [(h: Int32, w: Int32, kh: Int32, kw: Int32, sh: Int32, sw: Int32, ph: Int32, pw: Int32)] =
            [(5, 5, 5, 5, 1, 1, 2, 2), (20, 17, 3, 3, 2, 2, 1, 1), (9, 12, 2, 3, 2, 3, 0, 1), (7, 6, 3, 2, 1, 2, 1, 0), (1, 8, 1, 4, 1, 3, 0, 2), (3, 2, 2, 6, 1, 3, 1, 2)]
        let c = cases[index]
        var rng = SeededGenerator(seed: UInt64(410 + index))
        let planes = 5, hw = Int(c.h * c.w)
        var x = randomFloats(planes * hw, &rng)
        for i in stride(from: 3, to: x.count, by: 11) { x[i] = [Float.nan, -.infinity, .infinity][i % 3] }
        let oh = Int((c.h + 2 * c.ph - c.kh) / c.sh + 1), ow = Int((c.w + 2 * c.pw - c.kw) / c.sw + 1)
        var withIndex = [Float](repeating: 7, count: planes * oh * ow), values = withIndex, arg = [Int32](repeating: -9, count: withIndex.count)
        ql_max_pool2d_fwd(&withIndex, &arg, x, Int64(planes), c.h, c.w, c.kh, c.kw, c.sh, c.sw, c.ph, c.pw)
        ql_max_pool2d_fwd(&values, nil, x, Int64(planes), c.h, c.w, c.kh, c.kw, c.sh, c.sw, c.ph, c.pw)
        #expect(values.map(\.bitPattern) == withIndex.map(\.bitPattern))
        #expect(!values.contains { $0.isNaN })
        for (o, a) in arg.enumerated() {
            let v = x[(o / (oh * ow)) * hw + Int(a)]
            #expect(a >= 0 && a < Int32(hw) && (v == values[o] || (v.isNaN && values[o] == -.infinity)), "output \(o)")
        }
    }

    /// Sigmoid and SiLU compute their exponential with the project's own polynomial (so that
    /// the AVX2 loops and the INT8 epilogue give the scalar definition's bits): every level
    /// against the scalar loops bit for bit, on specials (zeros, NaN, infinities, subnormals,
    /// beyond exp's range) and tails; and the values against double precision.
    @Test("sigmoid and SiLU: every ISA gives the scalar loops' bits, forward and SiLU's backward", arguments: [1, 8, 13, 40_007])
    func logisticExact(n: Int) {
        var rng = SeededGenerator(seed: 31 + UInt64(n))
        let specials: [Float] = [0, -0.0, .nan, .infinity, -.infinity, .leastNonzeroMagnitude, -.leastNormalMagnitude, 87, -87, -87.5, 88.7, -104, 1e-8, -0.34657359]
        func sample() -> Float { rng.next() % 4 == 0 ? specials[Int(rng.next() % UInt64(specials.count))] : (rng.nextFloat() * 2 - 1) * (rng.next() % 2 == 0 ? 6 : 100) }
        let x = (0..<n).map { _ in sample() }, dy = (0..<n).map { _ in rng.nextFloat() * 2 - 1 }, start = (0..<n).map { _ in rng.nextFloat() * 2 - 1 }
        func bits(_ v: [Float]) -> [UInt32] { v.map { $0.isNaN ? 0x7FC0_0000 : $0.bitPattern } } // any NaN is NaN
        var reference: [[UInt32]] = []
        for isa in supportedISAs {
            var outputs: [[UInt32]] = []
            for op in [QL_UNARY_SIGMOID, QL_UNARY_SILU] {
                var y = [Float](repeating: 7, count: n)
                #expect(ql_unary_fwd_isa(isa, op, &y, x, Int64(n)) == 0)
                outputs.append(bits(y))
            }
            var written = [Float](repeating: .nan, count: n), accumulated = start
            #expect(ql_unary_bwd_into_isa(isa, QL_UNARY_SILU, &written, dy, x, nil, Int64(n), 0) == 0)
            #expect(ql_unary_bwd_into_isa(isa, QL_UNARY_SILU, &accumulated, dy, x, nil, Int64(n), 1) == 0)
            outputs += [bits(written), bits(accumulated)]
            if reference.isEmpty { reference = outputs }
            for (k, name) in ["sigmoid", "silu", "silu backward written", "silu backward accumulated"].enumerated() {
                #expect(outputs[k] == reference[k], "\(name), isa \(isa.rawValue), n \(n)")
            }
        }
        // the values: within 4 float ulps of the logistic function in double (2 from the exponential,
        // the rest from the division); NaN stays NaN
        var sig = [Float](repeating: 0, count: n)
        ql_unary_fwd(QL_UNARY_SIGMOID, &sig, x, Int64(n))
        for (xi, si) in zip(x, sig) {
            if xi.isNaN { #expect(si.isNaN); continue }
            let want = 1 / (1 + exp(-Double(xi)))
            #expect(abs(Double(si) - want) <= 4 * Double(Float(want).ulp) + 1e-37, "sigmoid(\(xi)) = \(si), want \(want)")
        }
    }

    /// Batch norm's sums (statistics; backward's sum dy and sum dy * xhat) have AVX2 loops that
    /// add in 8 double lanes: checked against the scalar chains and a double-precision
    /// definition, on planes shorter than, equal to and longer than a vector, and on values far
    /// from zero mean (where a float accumulation would lose digits).
    @Test("batch norm statistics and backward: every ISA agrees with the scalar sums", arguments: [1, 7, 8, 29, 400])
    func batchNormSums(hw: Int) {
        var rng = SeededGenerator(seed: 900 + UInt64(hw))
        let n = 3, c = 5, count = n * c * hw
        let x = (0..<count).map { _ in 40 + rng.nextFloat() * 2 }, dy = (0..<count).map { _ in rng.nextFloat() - 0.3 }
        let gamma = (0..<c).map { _ in 0.5 + rng.nextFloat() }
        func plane(_ v: [Float], _ i: Int, _ ch: Int) -> ArraySlice<Float> { v[((i * c + ch) * hw)..<((i * c + ch + 1) * hw)] }
        // the definition, in double
        var wantMean = [Double](repeating: 0, count: c), wantVar = wantMean
        for ch in 0..<c {
            let vals = (0..<n).flatMap { plane(x, $0, ch) }.map(Double.init)
            wantMean[ch] = vals.reduce(0, +) / Double(vals.count)
            wantVar[ch] = vals.map { ($0 - wantMean[ch]) * ($0 - wantMean[ch]) }.reduce(0, +) / Double(vals.count)
        }
        var results: [(mean: [Float], dx: [Float], dgamma: [Float], dbeta: [Float])] = []
        for isa in supportedISAs {
            var mean = [Float](repeating: 0, count: c), variance = mean
            #expect(ql_channel_stats_isa(isa, &mean, &variance, x, Int32(n), Int32(c), Int64(hw)) == 0)
            for ch in 0..<c {
                #expect(abs(Double(mean[ch]) - wantMean[ch]) <= 1e-6 * abs(wantMean[ch]), "isa \(isa), mean \(ch)")
                #expect(abs(Double(variance[ch]) - wantVar[ch]) <= 1e-5 * wantVar[ch] + 1e-12, "isa \(isa), var \(ch)")
            }
            let rstd = variance.map { 1 / ($0 + 1e-5).squareRoot() }
            var dx = [Float](repeating: 0, count: count), dgamma = [Float](repeating: 0, count: c), dbeta = dgamma
            #expect(ql_batch_norm_bwd_isa(isa, &dx, &dgamma, &dbeta, dy, x, mean, rstd, gamma, Int32(n), Int32(c), Int64(hw), 1) == 0)
            var written = [Float](repeating: .nan, count: count) // accumulate 0: written, the NaNs never read
            #expect(ql_batch_norm_bwd_isa(isa, &written, nil, nil, dy, x, mean, rstd, gamma, Int32(n), Int32(c), Int64(hw), 0) == 0)
            #expect(written == dx, "isa \(isa): written = added to zeros")
            results.append((mean, dx, dgamma, dbeta))
        }
        // every level against the scalar specification: the float terms are the same, only the
        // order of the double additions differs
        let ref = results[0]
        for (k, r) in results.enumerated().dropFirst() {
            #expect(r.mean == ref.mean, "isa \(supportedISAs[k]): the means are exact in double and round alike")
            for ch in 0..<c {
                #expect(abs(r.dbeta[ch] - ref.dbeta[ch]) <= 1e-5 * max(1, abs(ref.dbeta[ch])), "isa \(supportedISAs[k]), dbeta \(ch)")
                #expect(abs(r.dgamma[ch] - ref.dgamma[ch]) <= 1e-5 * max(1, abs(ref.dgamma[ch])), "isa \(supportedISAs[k]), dgamma \(ch)")
            }
            let scale = ref.dx.map { abs($0) }.max() ?? 1
            #expect(zip(r.dx, ref.dx).allSatisfy { abs($0 - $1) <= 1e-4 * scale }, "isa \(supportedISAs[k]), dx")
        }
    }

    @Test("SGEMM with beta = 0 ignores NaNs already in C; K = 0 scales C")
    func sgemmBetaZero() {
        let a: [Float] = [1, 2, 3, 4], b: [Float] = [1, 0, 0, 1]
        for isa in supportedISAs {
            var c = [Float](repeating: .nan, count: 4)
            #expect(ql_sgemm_isa(isa, 0, 0, 2, 2, 2, 1, a, 2, b, 2, 0, &c, 2) == 0)
            #expect(c == [1, 2, 3, 4])
            var d: [Float] = [1, 2, 3, 4]
            #expect(ql_sgemm_isa(isa, 0, 0, 2, 2, 0, 1, a, 2, b, 2, 3, &d, 2) == 0)
            #expect(d == [3, 6, 9, 12])
        }
    }

    @Test("SGEMM rejects inconsistent sizes")
    func sgemmInvalid() {
        var c = [Float](repeating: 0, count: 4)
        #expect(ql_sgemm(0, 0, 2, 2, 2, 1, [1, 2, 3, 4], 1, [1, 2, 3, 4], 2, 0, &c, 2) == Int32(QL_EINVAL))
        #expect(ql_sgemm(0, 0, -1, 2, 2, 1, [1, 2, 3, 4], 2, [1, 2, 3, 4], 2, 0, &c, 2) == Int32(QL_EINVAL))
    }

    /// A operands of the INT8 GEMM: full-range u8 (the sign-extend path on AVX2), and codes of
    /// at most 127 (a post-ReLU tensor quantized symmetrically: the vpmaddubsw path on AVX2),
    /// with rows of 127 against B = -128 and 127, the largest pair sums vpmaddubsw can see.
    enum AOperand: CaseIterable { case fullRange, atMost127 }

    @Test("INT8 GEMM u8 x s8 -> s32 is bit-exact against the reference", arguments: [
        (1, 1, 1), (7, 17, 63), (13, 33, 5), (129, 63, 17), (250, 40, 1100), (12, 32, 64), (3, 70, 2050),
    ], AOperand.allCases)
    func igemmExact(shape: (Int, Int, Int), operand: AOperand) {
        let (m, n, k) = shape
        var rng = SeededGenerator(seed: UInt64(m * 1000 + n * 10 + k))
        var a = (0..<(m * k)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        if operand == .atMost127 {
            a = a.map { $0 & 0x7F }
            for j in 0..<k { a[j] = 127 } // row 0 all 127: worst case for the s16 pair sums
        }
        var b = (0..<(k * n)).map { _ in Int8(truncatingIfNeeded: rng.next()) } // full range, -128 included
        if operand == .atMost127 { for i in 0..<k { b[i * n] = i % 3 == 0 ? 127 : -128 } } // column 0 at the extremes
        var want = [Int32](repeating: 0, count: m * n)
        #expect(ql_igemm_u8s8s32_ref(Int32(m), Int32(n), Int32(k), a, Int32(k), b, Int32(n), &want, Int32(n)) == 0)
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(k), Int32(n)))
        var colSum = [Int32](repeating: 0, count: n)
        #expect(ql_igemm_pack_b(&packed, &colSum, b, Int32(n), Int32(k), Int32(n)) == 0)
        for j in 0..<n { #expect(colSum[j] == (0..<k).reduce(Int32(0)) { $0 + Int32(b[$1 * n + j]) }) }
        for isa in supportedISAs {
            var got = [Int32](repeating: -1, count: m * n)
            #expect(ql_igemm_u8s8s32_isa(isa, Int32(m), Int32(n), Int32(k), a, Int32(k), packed, &got, Int32(n)) == 0)
            #expect(got == want, "isa \(isa.rawValue) \(m)x\(n)x\(k) \(operand)")
        }
    }

    @Test("Fused INT8 GEMM + epilogue (no activation, ReLU, SiLU; s8 and f32 out, column counts not a multiple of 8) equals the reference GEMM followed by the reference epilogue", arguments: [
        (1, 1, 3), (37, 45, 70), (250, 33, 1030), (300, 64, 96), (5, 200, 17),
    ], AOperand.allCases)
    func fusedIgemmExact(shape: (Int, Int, Int), operand: AOperand) {
        let (m, n, k) = shape
        var rng = SeededGenerator(seed: UInt64(7 * m + n + k))
        let a = (0..<(m * k)).map { _ in UInt8(truncatingIfNeeded: rng.next()) & (operand == .atMost127 ? 0x7F : 0xFF) }
        let b = (0..<(k * n)).map { _ in Int8(Int(rng.next() % 255) - 127) }
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(k), Int32(n)))
        var colSum = [Int32](repeating: 0, count: n)
        _ = ql_igemm_pack_b(&packed, &colSum, b, Int32(n), Int32(k), Int32(n))
        let offsets = colSum.map { -128 * $0 }
        let scale = (0..<n).map { _ in 1e-5 + 1e-3 * rng.nextFloat() }, bias = randomFloats(n, &rng, low: -2, high: 2)
        var acc = [Int32](repeating: 0, count: m * n)
        _ = ql_igemm_u8s8s32_ref(Int32(m), Int32(n), Int32(k), a, Int32(k), b, Int32(n), &acc, Int32(n))
        for relu: Int32 in [0, 1, 2] { // none, ReLU, SiLU
            var wantS8 = [Int8](repeating: 0, count: m * n), wantF32 = [Float](repeating: 0, count: m * n)
            _ = ql_requantize_s8_ref(Int32(m), Int32(n), &wantS8, Int32(n), acc, Int32(n), offsets, scale, bias, relu)
            _ = ql_dequantize_f32_ref(Int32(m), Int32(n), &wantF32, Int32(n), acc, Int32(n), offsets, scale, bias, relu)
            offsets.withUnsafeBufferPointer { off in
                scale.withUnsafeBufferPointer { sc in
                    bias.withUnsafeBufferPointer { bi in
                        var ep = ql_requant_params(col_offset: off.baseAddress, scale: sc.baseAddress, bias: bi.baseAddress, relu: relu)
                        for isa in supportedISAs {
                            var gotS8 = [Int8](repeating: 0, count: m * n), gotF32 = [Float](repeating: 0, count: m * n)
                            #expect(ql_igemm_u8s8_s8_isa(isa, Int32(m), Int32(n), Int32(k), a, Int32(k), packed, &ep, &gotS8, Int32(n)) == 0)
                            #expect(ql_igemm_u8s8_f32_isa(isa, Int32(m), Int32(n), Int32(k), a, Int32(k), packed, &ep, &gotF32, Int32(n)) == 0)
                            #expect(gotS8 == wantS8, "s8 isa \(isa.rawValue) \(m)x\(n)x\(k) relu \(relu) \(operand)")
                            #expect(gotF32 == wantF32, "f32 isa \(isa.rawValue) \(m)x\(n)x\(k) relu \(relu)")
                        }
                    }
                }
            }
        }
    }

    /// The direct conv (no im2col) against its definition: im2col of the same codes, the
    /// reference GEMM on the unpacked weights, the reference epilogue. Geometries: a partial
    /// last panel, stride 2, dilation, 1 x 1, an odd pixel count, one that the threads split by
    /// pixels and one (a 5 x 5 map, as the detector's deepest) that they split by panels; codes
    /// post-ReLU (0..127), signed (the vpsignb kernel), and 3 or 6 channels padded to 4 or 8;
    /// output channels filling a panel of 32, or at most 16 or 8 of it (the narrow kernels).
    @Test("Direct INT8 conv on NHWC codes equals im2col + the reference GEMM + the reference epilogue", arguments: [
        // N, C, H, W, K, KH/KW, stride, padding, dilation, codes (0: 0..127, 1: signed, 2: 0..127 with C padded to a multiple of 4)
        [2, 4, 7, 6, 5, 3, 1, 1, 1, 0], [1, 8, 9, 9, 40, 3, 2, 1, 1, 0], [3, 12, 5, 5, 70, 3, 1, 2, 2, 1],
        [2, 16, 11, 10, 33, 1, 1, 0, 1, 1], [1, 64, 20, 20, 64, 3, 1, 1, 1, 0], [1, 128, 5, 5, 96, 3, 1, 1, 1, 1],
        [2, 3, 9, 8, 16, 3, 2, 1, 1, 2], [1, 6, 7, 7, 9, 3, 1, 1, 1, 2],
        // a last panel of 9-16 columns under signed codes (44 = 32 + 12, and 12); the others are above
        [2, 8, 6, 7, 44, 3, 1, 1, 1, 1], [1, 4, 5, 6, 12, 3, 1, 1, 1, 1],
    ])
    func directConvExact(geometry v: [Int]) {
        let (n, c, h, w, k, kk, mode) = (v[0], v[1], v[2], v[3], v[4], v[5], v[9])
        var g = ql_conv_geom(N: Int32(n), C: Int32(c), H: Int32(h), W: Int32(w), K: Int32(k), KH: Int32(kk), KW: Int32(kk), SH: Int32(v[6]), SW: Int32(v[6]),
                             PH: Int32(v[7]), PW: Int32(v[7]), DH: Int32(v[8]), DW: Int32(v[8]), groups: 1)
        var oh: Int32 = 0, ow: Int32 = 0
        #expect(ql_conv_out_size(&g, &oh, &ow) == 0)
        let m = n * Int(oh) * Int(ow), depth = kk * kk * c
        var rng = SeededGenerator(seed: UInt64(v.reduce(17) { $0 &* 31 &+ $1 }))
        let x = (0..<(n * h * w * c)).map { _ in mode == 1 ? Int8(Int(rng.next() % 255) - 127) : Int8(rng.next() % 128) }
        let b = (0..<(depth * k)).map { _ in Int8(Int(rng.next() % 255) - 127) }
        let offset: Int32 = mode == 1 ? 128 : 0
        var col = [UInt8](repeating: 0, count: m * depth), acc = [Int32](repeating: 0, count: m * k), colSum = [Int32](repeating: 0, count: k)
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(depth), Int32(k)))
        _ = ql_igemm_pack_b(&packed, &colSum, b, Int32(k), Int32(depth), Int32(k))
        #expect(ql_im2col_nhwc_s8u8(&col, x, &g, offset) == 0)
        _ = ql_igemm_u8s8s32_ref(Int32(m), Int32(k), Int32(depth), col, Int32(depth), b, Int32(k), &acc, Int32(k))
        for i in 0..<m { for o in 0..<k { acc[i * k + o] -= offset * colSum[o] } } // the s8 x s8 product
        var input = x
        if mode == 2 { // pad the channels to 4: zero codes, zero weights
            let c4 = (c + 3) / 4 * 4, taps = kk * kk
            input = [Int8](repeating: 1, count: n * h * w * c4)
            ql_pad_channels_nhwc_s8(&input, x, Int64(n * h * w), Int32(c), Int32(c4))
            var b4 = [Int8](repeating: 0, count: taps * c4 * k)
            for t in 0..<taps { for ci in 0..<c { for o in 0..<k { b4[(t * c4 + ci) * k + o] = b[(t * c + ci) * k + o] } } }
            packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(taps * c4), Int32(k)))
            _ = ql_igemm_pack_b(&packed, nil, b4, Int32(k), Int32(taps * c4), Int32(k))
            var sink = [Int8](repeating: 0, count: m * k)
            let unpadded = withRequantParams(offsets: nil, scale: [Float](repeating: 1, count: k), bias: nil, relu: 0) { ql_iconv_nhwc_s8_isa(QL_ISA_REF, &g, x, packed, &$0, &sink) }
            #expect(unpadded == Int32(QL_EUNSUPPORTED), "3 channels: not without padding")
            g.C = Int32(c4)
        }
        let offsets = (0..<k).map { _ in Int32(rng.next() % 2001) - 1000 }
        let scale = (0..<k).map { _ in 1e-5 + 1e-3 * rng.nextFloat() }, bias = randomFloats(k, &rng, low: -2, high: 2)
        for relu: Int32 in [0, 1, 2] {
            var wantS8 = [Int8](repeating: 0, count: m * k), wantF32 = [Float](repeating: 0, count: m * k)
            _ = ql_requantize_s8_ref(Int32(m), Int32(k), &wantS8, Int32(k), acc, Int32(k), offsets, scale, bias, relu)
            _ = ql_dequantize_f32_ref(Int32(m), Int32(k), &wantF32, Int32(k), acc, Int32(k), offsets, scale, bias, relu)
            for isa in supportedISAs {
                var gotS8 = [Int8](repeating: 99, count: m * k), gotF32 = [Float](repeating: .nan, count: m * k)
                let (s8, f32) = withRequantParams(offsets: offsets, scale: scale, bias: bias, relu: relu) { ep in
                    (ql_iconv_nhwc_s8_isa(isa, &g, input, packed, &ep, &gotS8), ql_iconv_nhwc_f32_isa(isa, &g, input, packed, &ep, &gotF32))
                }
                #expect(s8 == 0 && f32 == 0)
                #expect(gotS8 == wantS8, "s8 isa \(isa.rawValue) \(v) relu \(relu)")
                #expect(gotF32 == wantF32, "f32 isa \(isa.rawValue) \(v) relu \(relu)")
            }
        }
    }

    @Test("Direct INT8 conv declines what it cannot compute exactly (a -128 weight under signed codes, C % 4 != 0, groups) and rejects a bad geometry")
    func directConvDeclines() {
        var g = ql_conv_geom(N: 1, C: 4, H: 3, W: 3, K: 2, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1)
        var weights = [Int8](repeating: 1, count: 36 * 2)
        weights[5] = -128
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(36, 2))
        _ = ql_igemm_pack_b(&packed, nil, weights, 2, 36, 2)
        var out = [Int8](repeating: 7, count: 9 * 2)
        var x = [Int8](repeating: 3, count: 36)
        func run(_ isa: ql_isa = QL_ISA_REF) -> Int32 {
            withRequantParams(offsets: nil, scale: [1, 1], bias: nil, relu: 0) { ql_iconv_nhwc_s8_isa(isa, &g, x, packed, &$0, &out) }
        }
        x[35] = -1
        for isa in supportedISAs { #expect(run(isa) == Int32(QL_EUNSUPPORTED), "signed codes with a -128 weight, isa \(isa.rawValue)") }
        #expect(out.allSatisfy { $0 == 7 }, "nothing written")
        x[35] = 1
        #expect(run() == 0, "non-negative codes: a -128 weight is exact")
        #expect(out.allSatisfy { $0 != 7 })
        g.C = 3
        #expect(run() == Int32(QL_EUNSUPPORTED))
        g.C = 4; g.groups = 2
        #expect(run() == Int32(QL_EUNSUPPORTED))
        g.groups = 1; g.KH = 7 // a 7-row window on 3 rows with padding 1: no output
        #expect(run() == Int32(QL_EINVAL))
    }

    @Test("Signed activations through u8 + 128 and the column-sum compensation give the s8 x s8 product")
    func igemmSignedCompensation() {
        var rng = SeededGenerator(seed: 5)
        let (m, n, k) = (9, 20, 37)
        let xs8 = (0..<(m * k)).map { _ in Int8(Int(rng.next() % 255) - 127) }
        let w = (0..<(k * n)).map { _ in Int8(Int(rng.next() % 255) - 127) }
        let xu8 = xs8.map { UInt8(Int($0) + 128) }
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(k), Int32(n)))
        var colSum = [Int32](repeating: 0, count: n)
        _ = ql_igemm_pack_b(&packed, &colSum, w, Int32(n), Int32(k), Int32(n))
        var acc = [Int32](repeating: 0, count: m * n)
        _ = ql_igemm_u8s8s32(Int32(m), Int32(n), Int32(k), xu8, Int32(k), packed, &acc, Int32(n))
        let offsets = colSum.map { -128 * $0 }
        var out = [Float](repeating: 0, count: m * n)
        let ones = [Float](repeating: 1, count: n)
        _ = ql_dequantize_f32(Int32(m), Int32(n), &out, Int32(n), acc, Int32(n), offsets, ones, nil, 0)
        for i in 0..<m {
            for j in 0..<n {
                let exact = (0..<k).reduce(0) { $0 + Int(xs8[i * k + $1]) * Int(w[$1 * n + j]) }
                #expect(out[i * n + j] == Float(exact))
            }
        }
    }

    @Test("Softmax rows: against a double-precision reference, and split between threads with each row's bits as when computed alone")
    func softmaxRowsSplit() {
        var rng = SeededGenerator(seed: 91)
        let (rows, cols) = (60, 189) // an attention's queries x keys: past the threshold where rows are shared out
        let x = randomFloats(rows * cols, &rng, low: -8, high: 8)
        var y = [Float](repeating: 0, count: rows * cols)
        ql_softmax_rows(&y, x, Int64(rows), Int32(cols))
        for r in 0..<rows {
            var alone = [Float](repeating: 0, count: cols)
            x.withUnsafeBufferPointer { ql_softmax_rows(&alone, $0.baseAddress! + r * cols, 1, Int32(cols)) }
            #expect(Array(y[(r * cols)..<((r + 1) * cols)]) == alone, "row \(r)")
            let row = x[(r * cols)..<((r + 1) * cols)].map(Double.init), m = row.max()!
            let e = row.map { Foundation.exp($0 - m) }, s = e.reduce(0, +)
            for c in 0..<cols { #expect(abs(Double(y[r * cols + c]) - e[c] / s) <= 1e-6 * (e[c] / s) + 1e-9) }
        }
    }

    @Test("Softmax rows: every ISA gives the reference's bits (lane tails, -inf keys, inf and NaN rows)", arguments: [1, 7, 8, 13, 64, 525])
    func softmaxRowsISAs(cols: Int) {
        var rng = SeededGenerator(seed: 92 &+ UInt64(cols))
        let rows = 6
        var x = randomFloats(rows * cols, &rng, low: -30, high: 30)
        x[cols - 1] = -.infinity                          // row 0: a masked key weighs 0
        x[cols + cols / 2] = .nan                          // row 1: NaN
        x[2 * cols] = .infinity                            // row 2: +inf
        for c in 0..<cols { x[3 * cols + c] = -.infinity } // row 3: every key masked
        x[4 * cols] = 200                                  // row 4: the others below exp's range
        var want = [Float](repeating: 0, count: rows * cols)
        #expect(ql_softmax_rows_isa(QL_ISA_REF, &want, x, Int64(rows), Int32(cols)) == 0)
        for isa in supportedISAs where isa != QL_ISA_REF {
            var got = [Float](repeating: 1, count: rows * cols)
            #expect(ql_softmax_rows_isa(isa, &got, x, Int64(rows), Int32(cols)) == 0)
            #expect(got.map(\.bitPattern) == want.map(\.bitPattern), "isa \(isa)")
        }
        if cols > 1 { #expect(want[cols - 1] == 0) }
        let nanRows = want[cols..<(4 * cols)].allSatisfy { $0.isNaN }, oneHot = want[(4 * cols + 1)..<(5 * cols)].allSatisfy { $0 == 0 }
        #expect(nanRows)
        #expect(want[4 * cols] == 1 && oneHot)
        let sum = want[(5 * cols)..<(6 * cols)].reduce(Double(0)) { $0 + Double($1) }
        #expect(abs(sum - 1) < 1e-5)
    }

    @Test("INT8 GEMM on signed codes (s8 x s8, f32 out) equals the exact integer product through the reference epilogue; a -128 in B is refused", arguments: [
        (1, 1, 3), (7, 45, 70), (30, 189, 8), (30, 8, 189), (65, 33, 1030),
    ])
    func signedIgemmExact(shape: (Int, Int, Int)) {
        let (m, n, k) = shape
        var rng = SeededGenerator(seed: UInt64(11 * m + n + k))
        let a = (0..<(m * k)).map { _ in Int8(truncatingIfNeeded: rng.next()) } // every s8 value, -128 too
        let b = (0..<(k * n)).map { _ in Int8(Int(rng.next() % 255) - 127) }
        var packed = [Int8](repeating: 0, count: ql_igemm_packed_size(Int32(k), Int32(n)))
        var colSum = [Int32](repeating: 0, count: n)
        _ = ql_igemm_pack_b(&packed, &colSum, b, Int32(n), Int32(k), Int32(n))
        var acc = [Int32](repeating: 0, count: m * n)
        for i in 0..<m { for j in 0..<n { acc[i * n + j] = Int32((0..<k).reduce(0) { $0 + Int(a[i * k + $1]) * Int(b[$1 * n + j]) }) } }
        let scale = (0..<n).map { _ in 1e-5 + 1e-3 * rng.nextFloat() }, bias = randomFloats(n, &rng, low: -2, high: 2)
        for relu: Int32 in [0, 1, 2] {
            var want = [Float](repeating: 0, count: m * n)
            _ = ql_dequantize_f32_ref(Int32(m), Int32(n), &want, Int32(n), acc, Int32(n), nil, scale, bias, relu)
            scale.withUnsafeBufferPointer { sc in
                bias.withUnsafeBufferPointer { bi in
                    var ep = ql_requant_params(col_offset: nil, scale: sc.baseAddress, bias: bi.baseAddress, relu: relu)
                    for isa in supportedISAs {
                        var got = [Float](repeating: 0, count: m * n)
                        #expect(ql_igemm_s8s8_f32_isa(isa, Int32(m), Int32(n), Int32(k), a, Int32(k), packed, &ep, &got, Int32(n)) == 0)
                        #expect(got == want, "isa \(isa.rawValue) \(m)x\(n)x\(k) relu \(relu)")
                    }
                }
            }
        }
        var withMinus128 = b
        withMinus128[b.count / 2] = -128
        _ = ql_igemm_pack_b(&packed, &colSum, withMinus128, Int32(n), Int32(k), Int32(n))
        scale.withUnsafeBufferPointer { sc in
            var ep = ql_requant_params(col_offset: nil, scale: sc.baseAddress, bias: nil, relu: 0)
            var out = [Float](repeating: 0, count: m * n)
            for isa in supportedISAs {
                #expect(ql_igemm_s8s8_f32_isa(isa, Int32(m), Int32(n), Int32(k), a, Int32(k), packed, &ep, &out, Int32(n)) == Int32(QL_EUNSUPPORTED))
            }
        }
    }

    @Test("Requantization: round half to even, clamp to [-127, 127], hand-computed")
    func requantizeHandCases() {
        // v = acc * 0.5: ties at every odd acc
        let acc: [Int32] = [5, 7, -5, -7, 1, -1, 1000, -1000, 254, 255, -255, 0]
        let expected: [Int8] = [2, 4, -2, -4, 0, 0, 127, -127, 127, 127, -127, 0]
        let n = acc.count
        let scale = [Float](repeating: 0.5, count: n)
        for isa in supportedISAs {
            var out = [Int8](repeating: 99, count: n)
            #expect(ql_requantize_s8_isa(isa, 1, Int32(n), &out, Int32(n), acc, Int32(n), nil, scale, nil, 0) == 0)
            #expect(out == expected, "isa \(isa.rawValue)")
        }
    }

    @Test("Requantization SIMD versions are bit-exact against the reference", arguments: [1, 7, 16, 17, 33, 100])
    func requantizeExact(n: Int) {
        var rng = SeededGenerator(seed: UInt64(n))
        let m = 5
        let acc = (0..<(m * n)).map { _ in Int32(truncatingIfNeeded: rng.next() % 200_001) - 100_000 }
        let offsets = (0..<n).map { _ in Int32(truncatingIfNeeded: rng.next() % 2001) - 1000 }
        let scale = (0..<n).map { _ in 1e-4 + 2e-3 * rng.nextFloat() }
        let bias = randomFloats(n, &rng, low: -3, high: 3)
        for relu: Int32 in [0, 1, 2] { // none, ReLU, SiLU
            var want = [Int8](repeating: 0, count: m * n)
            _ = ql_requantize_s8_ref(Int32(m), Int32(n), &want, Int32(n), acc, Int32(n), offsets, scale, bias, relu)
            for isa in supportedISAs {
                var got = [Int8](repeating: 0, count: m * n)
                _ = ql_requantize_s8_isa(isa, Int32(m), Int32(n), &got, Int32(n), acc, Int32(n), offsets, scale, bias, relu)
                #expect(got == want, "isa \(isa.rawValue) n \(n) relu \(relu)")
            }
        }
    }

    @Test("Fake quantization: scale = amax/127, half to even, clamp")
    func fakeQuantHandCases() {
        let x: [Float] = [2.5, 3.5, -2.5, 200, -200, 0.4, 126.6]
        var y = [Float](repeating: 0, count: x.count)
        ql_fake_quant_f32(&y, x, Int64(x.count), 127, 127)
        #expect(y == [2, 4, -2, 127, -127, 0, 127])
        ql_fake_quant_f32(&y, x, Int64(x.count), 0, 127)
        #expect(y.allSatisfy { $0 == 0 })
    }

    @Test("per-channel fake quantization, STE backward, channel amax and histogram, hand-computed")
    func quantKernelsHandCases() {
        // x is [outer 1, channels 2, inner 3]; channel 0 amax 127 (scale 1), channel 1 amax 12.7 (scale 0.1)
        let x: [Float] = [2.5, -130, 0.4, 0.25, 13, -0.05]
        var y = [Float](repeating: 0, count: 6)
        ql_fake_quant_per_channel_f32(&y, x, 1, 2, 3, [127, 12.7], 127)
        #expect(y[0] == 2 && y[1] == -127 && y[2] == 0)
        #expect(abs(y[3] - 0.2) < 1e-6 && abs(y[4] - 12.7) < 1e-5 && y[5] == 0) // 2.5 -> 2, 130 -> 127, -0.5 -> -0
        var dx: [Float] = [1, 1, 1, 1, 1, 1]
        ql_fake_quant_per_channel_bwd_f32(&dx, [1, 1, 1, 1, 1, 1], x, 1, 2, 3, [127, 12.7])
        #expect(dx == [2, 1, 2, 2, 1, 2]) // accumulates where |x| <= amax
        var amax: [Float] = [9, 9]
        ql_channel_absmax_f32(&amax, x, 1, 2, 3)
        #expect(amax == [130, 13])
        var counts = [Int64](repeating: 1, count: 4)
        ql_histogram_abs_f32(&counts, 4, [0, 0.99, 1, -1.5, 3.99, 4, 100], 7, 4)
        #expect(counts == [3, 3, 1, 4]) // bins of width 1 over [0, 4); >= 4 lands in the last bin
    }

    @Test("min/max and max |x| reductions against Swift's own, on awkward sizes; empty input")
    func reductions() throws {
        var rng = SeededGenerator(seed: 17)
        for n in [1, 7, 16, 17, 1000] {
            var x = randomFloats(n, &rng, low: -3, high: 2)
            x[n / 2] = n % 2 == 0 ? 5 : -7 // an extreme somewhere in the middle
            var lo: Float = 0, hi: Float = 0
            ql_minmax(x, Int64(n), &lo, &hi)
            #expect(lo == x.min()! && hi == x.max()!, "n \(n): [\(lo), \(hi)] vs [\(x.min()!), \(x.max()!)]")
            #expect(ql_absmax(x, Int64(n)) == x.map(abs).max()!)
        }
        var lo: Float = 0, hi: Float = 0
        ql_minmax([], 0, &lo, &hi)
        #expect(lo == .infinity && hi == -.infinity)
    }

    static let convCases: [ql_conv_geom] = [
        ql_conv_geom(N: 2, C: 3, H: 7, W: 9, K: 4, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
        ql_conv_geom(N: 3, C: 4, H: 11, W: 8, K: 6, KH: 3, KW: 2, SH: 2, SW: 1, PH: 0, PW: 1, DH: 2, DW: 1, groups: 2),
        ql_conv_geom(N: 2, C: 5, H: 6, W: 6, K: 7, KH: 1, KW: 1, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 1),
        ql_conv_geom(N: 1, C: 6, H: 13, W: 10, K: 6, KH: 5, KW: 5, SH: 2, SW: 3, PH: 2, PW: 2, DH: 1, DW: 1, groups: 6),
        ql_conv_geom(N: 4, C: 2, H: 5, W: 5, K: 3, KH: 3, KW: 3, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 1),
        // weights packed once for all images: 3x3 x 64 = 576 taps (over one K slab), 80
        // output channels per group (over one M block), two groups, more images than threads
        ql_conv_geom(N: 5, C: 128, H: 5, W: 4, K: 160, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 2),
    ]

    @Test("Convolution drivers (im2col + SGEMM) match direct loops", arguments: Array(0..<6))
    func convMatchesReference(index: Int) {
        var g = Self.convCases[index]
        var oh: Int32 = 0, ow: Int32 = 0
        #expect(ql_conv_out_size(&g, &oh, &ow) == 0)
        var rng = SeededGenerator(seed: UInt64(100 + index))
        let (n, c, k) = (Int(g.N), Int(g.C), Int(g.K))
        let xCount = n * c * Int(g.H) * Int(g.W), wCount = k * c / Int(g.groups) * Int(g.KH) * Int(g.KW)
        let yCount = n * k * Int(oh) * Int(ow)
        let x = randomFloats(xCount, &rng), w = randomFloats(wCount, &rng), b = randomFloats(k, &rng)
        let dy = randomFloats(yCount, &rng)
        var y = [Float](repeating: 0, count: yCount), yRef = y
        #expect(ql_conv2d_fwd(&y, x, w, b, &g) == 0)
        #expect(ql_conv2d_fwd_ref(&yRef, x, w, b, &g) == 0)
        #expect(firstMismatch(y, yRef, atol: 1e-4, rtol: 1e-5) == nil, "fwd case \(index)")
        // backward kernels accumulate: start from the same non-zero contents
        let dx0 = randomFloats(xCount, &rng), dw0 = randomFloats(wCount, &rng), db0 = randomFloats(k, &rng)
        var dx = dx0, dxRef = dx0, dw = dw0, dwRef = dw0, db = db0, dbRef = db0
        #expect(ql_conv2d_bwd_data(&dx, dy, w, &g) == 0)
        #expect(ql_conv2d_bwd_data_ref(&dxRef, dy, w, &g) == 0)
        #expect(firstMismatch(dx, dxRef, atol: 1e-4, rtol: 1e-5) == nil, "bwd data case \(index)")
        #expect(ql_conv2d_bwd_weight(&dw, &db, dy, x, &g) == 0)
        #expect(ql_conv2d_bwd_weight_ref(&dwRef, &dbRef, dy, x, &g) == 0)
        #expect(firstMismatch(dw, dwRef, atol: 1e-4, rtol: 1e-5) == nil, "bwd weight case \(index)")
        #expect(firstMismatch(db, dbRef, atol: 1e-4, rtol: 1e-5) == nil, "bwd bias case \(index)")
    }

    /// The forward and the weight gradient pack their GEMM's panels straight from the image
    /// (implicit GEMM) instead of from an im2col matrix, and on AVX2 a one-group forward reads
    /// the image directly (conv_direct.c): the operands hold the same values and the sums run in
    /// the same order, so the results must be the bits of im2col + SGEMM, computed here from the
    /// public kernels in the drivers' order (the weight gradient: one partial sum per task of
    /// consecutive images, each GEMM over several images' pixels, added in task order). Cases
    /// cross a K slab (KK > 512) and an N block (more than 3072 output pixels), put several
    /// images in one GEMM, and stride, dilate and pad unevenly with one group.
    /// y, and y through the ReLU and the SiLU ops (ql_unary_fwd): what a conv's act 0, 1, 2 write.
    static func activated(_ y: [Float]) -> [[Float]] {
        var relu = y, silu = y
        ql_unary_fwd(QL_UNARY_RELU, &relu, y, Int64(y.count))
        ql_unary_fwd(QL_UNARY_SILU, &silu, y, Int64(y.count))
        return [y, relu, silu]
    }

    @Test("Winograd F(2x2, 3x3) equals the reference conv within its error bound, every ISA, layout and activation; declines what is not 3x3 stride 1",
          arguments: Array(0..<5))
    func winogradConv(index: Int) {
        // odd and even maps (a last tile half outside), padding 0 and 1, channels not a multiple
        // of 8 (the vector loops' tails), one tile, many tiles past one block, batch > 1
        let cases = [ql_conv_geom(N: 2, C: 16, H: 10, W: 10, K: 32, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
                     ql_conv_geom(N: 1, C: 13, H: 7, W: 9, K: 11, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
                     ql_conv_geom(N: 3, C: 8, H: 6, W: 5, K: 24, KH: 3, KW: 3, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 1),
                     ql_conv_geom(N: 1, C: 40, H: 2, W: 2, K: 9, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
                     ql_conv_geom(N: 2, C: 24, H: 41, W: 38, K: 40, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1)]
        var g = cases[index]
        var oh: Int32 = 0, ow: Int32 = 0
        #expect(ql_conv_out_size(&g, &oh, &ow) == 0 && ql_winograd_f23_applies(&g) != 0)
        var rng = SeededGenerator(seed: UInt64(900 + index))
        let (n, c, k, h, w) = (Int(g.N), Int(g.C), Int(g.K), Int(g.H), Int(g.W)), p = Int(oh) * Int(ow)
        let x = randomFloats(n * c * h * w, &rng), wt = randomFloats(k * c * 9, &rng), b = randomFloats(k, &rng)
        var want = [Float](repeating: 0, count: n * k * p), bound = want
        #expect(ql_conv2d_fwd_ref(&want, x, wt, b, &g) == 0)
        // the error bound: a few units in the last place of sum |x| |w| + |b| (F(2, 3)'s
        // transforms add at most 4 terms of that size per product)
        #expect(ql_conv2d_fwd_ref(&bound, x.map(abs), wt.map(abs), b.map(abs), &g) == 0)
        let activated = Self.activated(want)
        let (ph, pw) = (Int(g.PH), Int(g.PW))
        var xPadded = [Float](repeating: .nan, count: n * (h + 2 * ph) * (w + 2 * pw) * c)
        ql_nchw_to_nhwc(&xPadded, x, g.N, g.C, g.H, g.W, g.PH, g.PW)
        var worst: Float = 0
        for isa in supportedISAs {
            var packed = [Float](repeating: .nan, count: ql_winograd_f23_packed_floats(isa, &g))
            #expect(ql_winograd_f23_pack(isa, &packed, wt, &g) == 0)
            for act: Int32 in [0, 1, 2] {
                for (xNHWC, yBorder) in [(false, -1), (true, -1), (true, 1), (false, 0)] {
                    let xl = ql_layout(nhwc: xNHWC ? 1 : 0, ph: xNHWC ? g.PH : 0, pw: xNHWC ? g.PW : 0)
                    let q = max(yBorder, 0), yl = ql_layout(nhwc: yBorder >= 0 ? 1 : 0, ph: Int32(q), pw: Int32(q))
                    let (yh, yw) = (Int(oh) + 2 * q, Int(ow) + 2 * q)
                    var y = [Float](repeating: .nan, count: n * k * yh * yw)
                    let status = ql_winograd_f23_fwd_layout(isa, &y, yl, xNHWC ? xPadded : x, xl, packed, b, &g, act)
                    #expect(status == 0, "isa \(isa.rawValue)")
                    var nchw = y
                    if yBorder >= 0 { ql_nhwc_to_nchw(&nchw, y, g.N, g.K, oh, ow, Int32(q), Int32(q)) }
                    for i in 0..<(n * k * p) {
                        let err = abs(nchw[i] - activated[Int(act)][i]), tol = 1e-5 * (bound[i] + 1)
                        worst = max(worst, err / tol)
                        if !(err <= tol) {
                            Issue.record("case \(index) isa \(isa.rawValue) act \(act) x NHWC \(xNHWC) y border \(yBorder): element \(i) \(nchw[i]) vs \(activated[Int(act)][i])")
                            return
                        }
                    }
                    if yBorder > 0 { // the border is zeroed
                        var border = 0
                        for img in 0..<n { for r in 0..<yh { for col in 0..<yw where r < q || r >= yh - q || col < q || col >= yw - q {
                            border += (0..<k).filter { y[((img * yh + r) * yw + col) * k + $0] != 0 }.count } } }
                        #expect(border == 0, "case \(index): \(border) border values not zero")
                    }
                }
            }
        }
        // the bound is not loose: the worst error is a visible part of it
        #expect(worst > 1e-3, "worst error \(worst) of the bound")
        // not 3x3 stride 1: declined
        for (kh, sh) in [(Int32(1), Int32(1)), (3, 2), (5, 1)] {
            var other = g
            (other.KH, other.KW, other.SH, other.SW) = (kh, kh, sh, sh)
            var packed = [Float](repeating: 0, count: 16 * Int(g.C * g.K))
            #expect(ql_winograd_f23_applies(&other) == 0 && ql_winograd_f23_packed_floats(QL_ISA_REF, &other) == 0
                    && ql_winograd_f23_pack(QL_ISA_REF, &packed, wt, &other) == Int32(QL_EINVAL))
        }
    }

    @Test("Convolution forward, data and weight gradients: the implicit, batched and direct kernels give im2col + SGEMM's bits",
          arguments: Array(0..<15))
    func convImplicitExact(index: Int) {
        let extra = [ql_conv_geom(N: 3, C: 72, H: 9, W: 11, K: 40, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
                     ql_conv_geom(N: 1, C: 3, H: 122, W: 64, K: 16, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
                     // small maps, many images: several images' pixels side by side in one GEMM
                     // (5x5: 3 images fill 80-column tiles), the last group ragged; unpadded, grouped
                     ql_conv_geom(N: 13, C: 16, H: 5, W: 5, K: 24, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
                     ql_conv_geom(N: 9, C: 8, H: 6, W: 7, K: 6, KH: 3, KW: 3, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 2),
                     // 400 pixels: the weight gradient's GEMMs take 6 images each (2048 pixels deep)
                     ql_conv_geom(N: 14, C: 4, H: 20, W: 20, K: 8, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
                     // one group, so the direct kernel where it applies: strided, dilated, uneven
                     // padding; and a stride-2 3x3 whose 25-pixel maps share tiles across images
                     ql_conv_geom(N: 3, C: 20, H: 13, W: 11, K: 17, KH: 3, KW: 2, SH: 2, SW: 1, PH: 1, PW: 0, DH: 2, DW: 1, groups: 1),
                     ql_conv_geom(N: 2, C: 40, H: 10, W: 10, K: 33, KH: 3, KW: 3, SH: 2, SW: 2, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
                     // maps shorter than the kernel: every row a border row (the direct kernel skips the
                     // taps a row reads in the padding), tiles across rows and images, depth past one
                     // 512-slab so a slab starts mid-channel; a 5-row kernel on 4 rows
                     ql_conv_geom(N: 2, C: 60, H: 2, W: 7, K: 20, KH: 3, KW: 3, SH: 1, SW: 1, PH: 1, PW: 1, DH: 1, DW: 1, groups: 1),
                     ql_conv_geom(N: 3, C: 24, H: 4, W: 9, K: 18, KH: 5, KW: 3, SH: 1, SW: 1, PH: 2, PW: 1, DH: 1, DW: 1, groups: 1)]
        var g = index < 6 ? Self.convCases[index] : extra[index - 6]
        var oh: Int32 = 0, ow: Int32 = 0
        #expect(ql_conv_out_size(&g, &oh, &ow) == 0)
        var rng = SeededGenerator(seed: UInt64(700 + index))
        let (n, groups) = (Int(g.N), Int(g.groups))
        let (cg, kg, hw, p) = (Int(g.C) / groups, Int(g.K) / groups, Int(g.H) * Int(g.W), Int(oh) * Int(ow))
        let kk = cg * Int(g.KH) * Int(g.KW)
        let x = randomFloats(n * Int(g.C) * hw, &rng), w = randomFloats(Int(g.K) * kk, &rng), b = randomFloats(Int(g.K), &rng)
        let dy = randomFloats(n * Int(g.K) * p, &rng), dw0 = randomFloats(Int(g.K) * kk, &rng)
        var col = [Float](repeating: 0, count: kk * p)
        func im2col(_ image: Int, _ grp: Int) {
            x.withUnsafeBufferPointer { xs in
                ql_im2col(&col, xs.baseAddress! + (image * Int(g.C) + grp * cg) * hw, Int32(cg), g.H, g.W, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW)
            }
        }
        // forward
        var y = [Float](repeating: .nan, count: n * Int(g.K) * p), want = y
        #expect(ql_conv2d_fwd(&y, x, w, b, &g) == 0)
        for image in 0..<n {
            for grp in 0..<groups {
                let out = (image * Int(g.K) + grp * kg) * p
                for k in 0..<kg { for i in 0..<p { want[out + k * p + i] = b[grp * kg + k] } }
                im2col(image, grp)
                want.withUnsafeMutableBufferPointer { ws in
                    _ = ql_sgemm_isa(QL_ISA_BEST, 0, 0, Int32(kg), Int32(p), Int32(kk), 1, Array(w[(grp * kg * kk)...]), Int32(kk), col, Int32(p), 1, ws.baseAddress! + out, Int32(p))
                }
            }
        }
        func firstDifference(_ a: [Float], _ b: [Float]) -> Int? { a.indices.first { a[$0].bitPattern != b[$0].bitPattern } }
        #expect(firstDifference(y, want) == nil, "forward, case \(index)")
        // the same with the weights packed once beforehand (the engine's float convs), and with
        // a packing for another level (then packed anew)
        let floats = ql_conv2d_fwd_packed_floats(&g)
        if floats > 0 {
            var packed = [Float](repeating: .nan, count: floats)
            let level = ql_conv2d_fwd_pack(&packed, w, &g)
            #expect(level >= 0)
            // act 1 / 2: the engine's ReLU / SiLU fused in (the op's bits on the same sums)
            let activated = Self.activated(want)
            for claimed in [level, level + 7] {
                for act: Int32 in [0, 1, 2] {
                    var yp = [Float](repeating: .nan, count: y.count)
                    #expect(ql_conv2d_fwd_prepacked(&yp, x, w, packed, claimed, b, &g, act) == 0)
                    #expect(firstDifference(yp, activated[Int(act)]) == nil, "forward on prepacked weights (level \(claimed), act \(act)), case \(index)")
                }
            }
            #expect(ql_conv2d_fwd_prepacked(&y, x, w, packed, level, b, &g, 3) == Int32(QL_EINVAL), "an unknown activation")
        }
        do { // chains of convs (the engine's FP32 plan), at every level (elsewhere than the direct kernel: through NCHW copies)
            var packed = [Float](repeating: 0, count: max(floats, 1))
            let level = floats > 0 ? ql_conv2d_fwd_pack(&packed, w, &g) : -1
            let activated = Self.activated(want)
            // the input padded NHWC with the conv's own padding and / or
            // the output NHWC with a zero border, the same values; the border
            // +0.0 although the buffer held NaNs; an input with another padding is refused
            let (c, k) = (Int(g.C), Int(g.K))
            var xh = [Float](repeating: .nan, count: n * c * (Int(g.H) + 2 * Int(g.PH)) * (Int(g.W) + 2 * Int(g.PW)))
            ql_nchw_to_nhwc(&xh, x, g.N, g.C, g.H, g.W, g.PH, g.PW)
            let (qh, qw) = (2, 1), outPadded = n * k * (Int(oh) + 2 * qh) * (Int(ow) + 2 * qw)
            for (inNHWC, outNHWC, act) in [(true, false, Int32(1)), (false, true, 2), (true, true, 2), (true, true, 0)] {
                let xl = ql_layout(nhwc: inNHWC ? 1 : 0, ph: inNHWC ? g.PH : 0, pw: inNHWC ? g.PW : 0)
                let yl = ql_layout(nhwc: outNHWC ? 1 : 0, ph: outNHWC ? Int32(qh) : 0, pw: outNHWC ? Int32(qw) : 0)
                var out = [Float](repeating: .nan, count: outNHWC ? outPadded : y.count)
                #expect(ql_conv2d_fwd_prepacked_layout(&out, yl, inNHWC ? xh : x, xl, w, packed, level, b, &g, act) == 0)
                var back = out
                if outNHWC {
                    back = [Float](repeating: .nan, count: y.count)
                    ql_nhwc_to_nchw(&back, out, g.N, g.K, oh, ow, Int32(qh), Int32(qw))
                    var border = 0, zeros = 0
                    for i in 0..<n { for h in 0..<(Int(oh) + 2 * qh) { for wq in 0..<(Int(ow) + 2 * qw) where h < qh || h >= Int(oh) + qh || wq < qw || wq >= Int(ow) + qw {
                        for ch in 0..<k { border += 1; zeros += out[((i * (Int(oh) + 2 * qh) + h) * (Int(ow) + 2 * qw) + wq) * k + ch].bitPattern == 0 ? 1 : 0 }
                    } } }
                    #expect(border > 0 && zeros == border, "NHWC output's border, case \(index)")
                }
                #expect(firstDifference(back, activated[Int(act)]) == nil, "forward in layouts (in NHWC \(inNHWC), out NHWC \(outNHWC), act \(act)), case \(index)")
            }
            var out = [Float](repeating: 0, count: outPadded)
            #expect(ql_conv2d_fwd_prepacked_layout(&out, ql_layout(nhwc: 1, ph: 0, pw: 0), xh, ql_layout(nhwc: 1, ph: g.PH + 1, pw: g.PW), w, packed, level, b, &g, 1)
                    == Int32(QL_EINVAL), "an NHWC input padded otherwise than the conv")
        }
        // data gradient: col = W_g^T dy_g, then col2im, image by image (the drivers batch the
        // GEMM over images where the maps are small: the same sums); or, where the direct
        // kernel takes it (AVX2, one group, stride 1, not pointwise), the adjoint conv: dy
        // convolved with the transposed, flipped weights at padding D*(K-1) - P, computed here
        // as im2col of dy + SGEMM, then added to dx
        let dx0 = randomFloats(n * Int(g.C) * hw, &rng)
        var dx = dx0, wantDX = dx0
        #expect(ql_conv2d_bwd_data(&dx, dy, w, &g) == 0)
        let (padH, padW) = (g.DH * (g.KH - 1) - g.PH, g.DW * (g.KW - 1) - g.PW)
        let adjoint = ql_isa_best() == QL_ISA_AVX2 && groups == 1 && g.SH == 1 && g.SW == 1 && padH >= 0 && padW >= 0
            && !(g.KH == 1 && g.KW == 1 && g.PH == 0 && g.PW == 0)
        if adjoint {
            let (c, k, taps) = (Int(g.C), Int(g.K), Int(g.KH * g.KW))
            var flipped = [Float](repeating: 0, count: w.count) // [C][K][KH][KW]
            for o in 0..<k { for i in 0..<c { for t in 0..<taps { flipped[(i * k + o) * taps + t] = w[(o * c + i) * taps + taps - 1 - t] } } }
            var dycol = [Float](repeating: 0, count: k * taps * hw), conv = [Float](repeating: 0, count: c * hw)
            for image in 0..<n {
                dy.withUnsafeBufferPointer { d in
                    ql_im2col(&dycol, d.baseAddress! + image * k * p, Int32(k), oh, ow, g.KH, g.KW, 1, 1, padH, padW, g.DH, g.DW)
                }
                _ = ql_sgemm_isa(QL_ISA_BEST, 0, 0, Int32(c), Int32(hw), Int32(k * taps), 1, flipped, Int32(k * taps), dycol, Int32(hw), 0, &conv, Int32(hw))
                for i in 0..<(c * hw) { wantDX[image * c * hw + i] += conv[i] }
            }
        } else {
            for image in 0..<n {
                for grp in 0..<groups {
                    _ = ql_sgemm_isa(QL_ISA_BEST, 1, 0, Int32(kk), Int32(p), Int32(kg), 1, Array(w[(grp * kg * kk)...]), Int32(kk),
                                     Array(dy[((image * Int(g.K) + grp * kg) * p)...]), Int32(p), 0, &col, Int32(p))
                    wantDX.withUnsafeMutableBufferPointer { ds in
                        ql_col2im(ds.baseAddress! + (image * Int(g.C) + grp * cg) * hw, col, Int32(cg), g.H, g.W, g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW)
                    }
                }
            }
        }
        #expect(firstDifference(dx, wantDX) == nil, "data gradient, case \(index)")
        // weight gradient
        var dw = dw0, wantDW = dw0, db = [Float](repeating: 0, count: Int(g.K))
        #expect(ql_conv2d_bwd_weight(&dw, &db, dy, x, &g) == 0)
        let threads = Int(ql_get_num_threads()), parallel = n >= threads && threads > 1, tasks = parallel ? min(threads, n) : 1
        // the direct kernel's (AVX2, one group, pointwise too): per task of consecutive images a
        // partial [K][KK], passes of up to 2048 / P images whose pixels run on in one sum (fused
        // multiply-adds from zero in image, pixel order), each pass added to the partial; the
        // partials added to dW in task order
        if ql_isa_best() == QL_ISA_AVX2 && groups == 1 {
            let k = Int(g.K)
            var cols: [[Float]] = []
            for image in 0..<n { im2col(image, 0); cols.append(col) }
            for t in 0..<tasks {
                var partial = [Float](repeating: 0, count: k * kk)
                let (n0, n1) = (t * n / tasks, (t + 1) * n / tasks)
                let m = max(1, min(max(1, 2048 / p), n1 - n0))
                for first in stride(from: n0, to: n1, by: m) {
                    let count = min(m, n1 - first)
                    for o in 0..<k {
                        for r in 0..<kk {
                            var acc: Float = 0
                            for i in 0..<count { for q in 0..<p { acc.addProduct(cols[first + i][r * p + q], dy[((first + i) * k + o) * p + q]) } }
                            partial[o * kk + r] += acc
                        }
                    }
                }
                for i in 0..<(k * kk) { wantDW[i] += partial[i] }
            }
        } else {
            // images per GEMM where the images run in parallel (the driver's weight_grad_images: a
            // depth of 2048 pixels), their pixels side by side: col [KK, m*P] x dy^T [m*P, Kg]
            let perGEMM = parallel && !(g.KH == 1 && g.KW == 1 && g.SH == 1 && g.SW == 1 && g.PH == 0 && g.PW == 0) && ql_isa_best() != QL_ISA_REF
                ? max(1, (2048 + p - 1) / p) : 1
            for t in 0..<tasks {
                var partial = [Float](repeating: 0, count: Int(g.K) * kk) // per group [KK, Kg]
                let (n0, n1) = (t * n / tasks, (t + 1) * n / tasks)
                for first in stride(from: n0, to: n1, by: perGEMM) {
                    let m = min(perGEMM, n1 - first), width = m * p
                    for grp in 0..<groups {
                        var cols = [Float](repeating: 0, count: kk * width), dys = [Float](repeating: 0, count: kg * width)
                        for i in 0..<m {
                            im2col(first + i, grp)
                            for r in 0..<kk { for q in 0..<p { cols[r * width + i * p + q] = col[r * p + q] } }
                            for c in 0..<kg { for q in 0..<p { dys[c * width + i * p + q] = dy[((first + i) * Int(g.K) + grp * kg + c) * p + q] } }
                        }
                        partial.withUnsafeMutableBufferPointer { ps in
                            _ = ql_sgemm_isa(QL_ISA_BEST, 0, 1, Int32(kk), Int32(kg), Int32(width), 1, cols, Int32(width), dys, Int32(width),
                                             first == n0 ? 0 : 1, ps.baseAddress! + grp * kg * kk, Int32(kg))
                        }
                    }
                }
                for grp in 0..<groups { for k in 0..<kg { for i in 0..<kk { wantDW[grp * kg * kk + k * kk + i] += partial[grp * kg * kk + i * kg + k] } } }
            }
        }
        #expect(firstDifference(dw, wantDW) == nil, "weight gradient, case \(index)")
    }

    @Test("col2im is the adjoint of im2col: <col2im(c), x> = <c, im2col(x)>")
    func im2colAdjoint() {
        var rng = SeededGenerator(seed: 3)
        let (c, h, w, kh, kw, sh, sw, ph, pw, dh, dw) = (3, 9, 7, 3, 2, 2, 1, 1, 2, 2, 1)
        let oh = (h + 2 * ph - dh * (kh - 1) - 1) / sh + 1, ow = (w + 2 * pw - dw * (kw - 1) - 1) / sw + 1
        let x = randomFloats(c * h * w, &rng), col = randomFloats(c * kh * kw * oh * ow, &rng)
        var colX = [Float](repeating: 0, count: col.count), back = [Float](repeating: 0, count: x.count)
        ql_im2col(&colX, x, Int32(c), Int32(h), Int32(w), Int32(kh), Int32(kw), Int32(sh), Int32(sw), Int32(ph), Int32(pw), Int32(dh), Int32(dw))
        ql_col2im(&back, col, Int32(c), Int32(h), Int32(w), Int32(kh), Int32(kw), Int32(sh), Int32(sw), Int32(ph), Int32(pw), Int32(dh), Int32(dw))
        let lhs = zip(back, x).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        let rhs = zip(col, colX).reduce(0.0) { $0 + Double($1.0) * Double($1.1) }
        #expect(abs(lhs - rhs) <= 1e-4 * max(1, abs(rhs)))
    }

    @Test("Impossible convolution geometry is rejected")
    func convInvalid() {
        var g = ql_conv_geom(N: 1, C: 3, H: 2, W: 2, K: 4, KH: 5, KW: 5, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 1)
        var oh: Int32 = 0, ow: Int32 = 0
        #expect(ql_conv_out_size(&g, &oh, &ow) == Int32(QL_EINVAL))
        g = ql_conv_geom(N: 1, C: 3, H: 8, W: 8, K: 4, KH: 3, KW: 3, SH: 1, SW: 1, PH: 0, PW: 0, DH: 1, DW: 1, groups: 2)
        #expect(ql_conv_out_size(&g, &oh, &ow) == Int32(QL_EINVAL))
    }

    @Test("Pooling forward on a hand-computed case")
    func poolingHandCase() throws {
        let x = try Tensor(shape: [1, 1, 3, 3], values: [1, 2, 3, 4, 5, 6, 7, 8, 9])
        #expect(maxPool2d(x, kernel: 2, stride: 1).values == [5, 6, 8, 9])
        // padding 1, stride 2: corners see 1, 2 (or 2 with count_include_pad = false) elements
        #expect(avgPool2d(x, kernel: 2, stride: 2, padding: 1, countIncludePad: false).values == [1, 2.5, 5.5, 7])
        #expect(avgPool2d(x, kernel: 2, stride: 2, padding: 1, countIncludePad: true).values == [0.25, 1.25, 2.75, 7])
        #expect(upsampleNearest(try Tensor(shape: [1, 1, 1, 2], values: [1, 2]), scale: 2).values == [1, 1, 2, 2, 1, 1, 2, 2])
    }

    /// Serial (this thread's kernels only, `ql_set_thread_serial`) against the pool. It used to
    /// set the global thread count to 1 and back, which changed the split, so the summation
    /// order, of every kernel that other tests were running at that moment — and a test that
    /// compares two training runs bit for bit failed now and then.
    @Test("Serial and pooled SGEMM agree beyond rounding, without touching the global thread count")
    func threadsAgree() {
        var rng = SeededGenerator(seed: 8)
        let (m, n, k) = (200, 300, 150)
        let a = randomFloats(m * k, &rng), b = randomFloats(k * n, &rng)
        let threads = ql_get_num_threads()
        var c1 = [Float](repeating: 0, count: m * n), c2 = c1
        ql_set_thread_serial(1)
        _ = ql_sgemm(0, 0, Int32(m), Int32(n), Int32(k), 1, a, Int32(k), b, Int32(n), 0, &c1, Int32(n))
        ql_set_thread_serial(0)
        _ = ql_sgemm(0, 0, Int32(m), Int32(n), Int32(k), 1, a, Int32(k), b, Int32(n), 0, &c2, Int32(n))
        #expect(ql_get_num_threads() == threads)
        #expect(firstMismatch(c2, c1, atol: 1e-4, rtol: 1e-5) == nil)
    }
}
