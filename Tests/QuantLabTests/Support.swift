import CKernels
import Foundation
@testable import QuantLabCore
@testable import QuantLabData
@testable import QuantLabModels
@testable import QuantLabQuant
@testable import QuantLabReport
import Testing

/// A tiny RepVGG detector (64 px) initialised from its own seed: the model the training and
/// checkpoint tests build twice to compare two runs.
func tinyDetector(seed: UInt64, classes: Int) -> YOLOv6 {
    var rng = SeededGenerator(seed: seed)
    return YOLOv6(.tiny(block: .repvgg, numClasses: classes, inputSize: 64), rng: &rng)
}

/// First index where |actual - expected| > atol + rtol * |expected|, with a message, or nil.
func firstMismatch(_ actual: [Float], _ expected: [Float], atol: Double, rtol: Double) -> String? {
    guard actual.count == expected.count else { return "count \(actual.count) != \(expected.count)" }
    for i in 0..<actual.count {
        let a = Double(actual[i]), e = Double(expected[i])
        if !(abs(a - e) <= atol + rtol * abs(e)) { return "index \(i): got \(a), expected \(e) (atol \(atol), rtol \(rtol))" }
    }
    return nil
}

func randomFloats(_ n: Int, _ rng: inout SeededGenerator, low: Float = -1, high: Float = 1) -> [Float] {
    (0..<n).map { _ in low + (high - low) * rng.nextFloat() }
}

func tensor(_ shape: [Int], _ rng: inout SeededGenerator, low: Float = -1, high: Float = 1) -> Tensor {
    Tensor.uniform(shape, low: low, high: high, rng: &rng)
}

/// Values in random order, spaced `gap` apart: no ties, and no kink (max, relu, abs) is
/// crossed by a finite-difference step smaller than gap/2.
func spacedTensor(_ shape: [Int], _ rng: inout SeededGenerator, gap: Float = 0.05, offset: Float = 0.025) -> Tensor {
    let n = shape.reduce(1, *)
    var vals = (0..<n).map { Float($0 - n / 2) * gap + offset }
    vals.shuffle(using: &rng)
    return try! Tensor(shape: shape, values: vals)
}

/// Checks the analytical gradient of every input of `f` against central finite differences
/// of L = sum(f(inputs) * W) for a fixed random W. Returns the failures (empty = pass).
func gradientCheck(_ name: String, _ inputs: [Tensor], eps: Float = 1e-2, atol: Double = 1e-3, rtol: Double = 1e-2,
                   samplesPerInput: Int = 20, seed: UInt64 = 99, _ f: ([Tensor]) -> Tensor) -> [String] {
    var rng = SeededGenerator(seed: seed)
    for x in inputs { x.requiresGrad = true; x.grad = nil }
    let out = f(inputs)
    let w = Tensor.uniform(out.shape, low: -1, high: 1, rng: &rng)
    (out * w).sum().backward()
    func objective() -> Double {
        withNoGrad {
            let y = f(inputs)
            var s = 0.0
            for i in 0..<y.count { s += Double(y.data[i]) * Double(w.data[i]) }
            return s
        }
    }
    var failures: [String] = []
    for (k, x) in inputs.enumerated() {
        let analytic = x.grad?.values ?? [Float](repeating: 0, count: x.count)
        var indices = Array(0..<x.count)
        if indices.count > samplesPerInput { indices.shuffle(using: &rng); indices = Array(indices.prefix(samplesPerInput)) }
        for j in indices {
            let orig = x.data[j]
            x.data[j] = orig + eps
            let lp = objective()
            x.data[j] = orig - eps
            let lm = objective()
            x.data[j] = orig
            let numeric = (lp - lm) / (2 * Double(eps))
            let a = Double(analytic[j])
            if !(abs(a - numeric) <= atol + rtol * abs(numeric)) {
                failures.append("\(name): input \(k) index \(j): analytic \(a), numeric \(numeric)")
            }
        }
    }
    return failures
}

/// ISA levels this CPU can run, the reference first.
var supportedISAs: [ql_isa] {
    [QL_ISA_REF, QL_ISA_AVX2, QL_ISA_AVX512].filter { ql_isa_supported($0) != 0 }
}

/// Expects `body` to throw an `E` whose message contains every fragment. Nothing thrown is a
/// failure too (a bare `do { try ... } catch { #expect(...) }` passes when nothing is thrown,
/// which is how two tests here once could not fail).
func expectError<E: Error>(_ type: E.Type, mentioning fragments: String..., sourceLocation: SourceLocation = #_sourceLocation,
                           _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected \(E.self) mentioning \(fragments), nothing was thrown", sourceLocation: sourceLocation)
    } catch let e as E {
        for f in fragments { #expect("\(e)".contains(f), "message '\(e)' lacks '\(f)'", sourceLocation: sourceLocation) }
    } catch {
        Issue.record("expected \(E.self), got \(Swift.type(of: error)): \(error)", sourceLocation: sourceLocation)
    }
}

/// Cosine of the angle between two vectors, in double.
func cosineSimilarity(_ a: [Float], _ b: [Float]) -> Double {
    var ab = 0.0, aa = 0.0, bb = 0.0
    for (x, y) in zip(a, b) { ab += Double(x) * Double(y); aa += Double(x) * Double(x); bb += Double(y) * Double(y) }
    return ab / (aa.squareRoot() * bb.squareRoot())
}

/// Epilogue parameters pointing into arrays for the duration of `body` (the struct holds
/// pointers, which an array converted in its initializer would not keep valid).
func withRequantParams<R>(offsets: [Int32]?, scale: [Float], bias: [Float]?, relu: Int32, _ body: (inout ql_requant_params) -> R) -> R {
    (offsets ?? []).withUnsafeBufferPointer { off in
        scale.withUnsafeBufferPointer { sc in
            (bias ?? []).withUnsafeBufferPointer { bi in
                var ep = ql_requant_params(col_offset: offsets == nil ? nil : off.baseAddress, scale: sc.baseAddress,
                                           bias: bias == nil ? nil : bi.baseAddress, relu: relu)
                return body(&ep)
            }
        }
    }
}
