import CKernels
import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels

// Fake quantization: x -> dequantize(quantize(x)), computed in float so that a model keeps
// running in FP32 while seeing exactly the values an INT8 engine would compute with.
//
// TensorRT's convention (pytorch-quantization, the article's toolchain):
//   s = amax / 127,  q = clamp(round_half_to_even(x / s), -127, 127),  y = q * s
// weights per output channel (one amax per channel), activations per tensor. The backward
// is the straight-through estimator with clipping: dy/dx = 1 where |x| <= amax, else 0.

/// How a tensor is quantized.
public struct QuantSpec: Codable, Equatable, Hashable, Sendable {
    public enum Mode: String, Codable, Sendable {
        /// Signed, zero point 0, narrow range [-(2^(b-1)-1), 2^(b-1)-1] (TensorRT).
        case symmetric
        /// Unsigned with a zero point, [0, 2^b - 1] (uint8 backends: ONNX Runtime on x86, TFLite).
        case asymmetric
    }

    public var bits: Int
    public var mode: Mode
    /// nil: one scale for the tensor; otherwise one scale per index along this axis.
    public var axis: Int?

    public init(bits: Int = 8, mode: Mode = .symmetric, axis: Int? = nil) {
        require((2...16).contains(bits), "QuantSpec: bits must be in 2...16, got \(bits)")
        require(mode == .symmetric || axis == nil, "QuantSpec: asymmetric quantization is per tensor here")
        self.bits = bits
        self.mode = mode
        self.axis = axis
    }

    /// Per-tensor INT8, TensorRT's activation quantizer.
    public static let int8PerTensor = QuantSpec()
    /// Per-channel INT8 along `axis`, TensorRT's weight quantizer.
    public static func int8PerChannel(axis: Int) -> QuantSpec { QuantSpec(axis: axis) }
    /// Per-tensor UINT8 with a zero point.
    public static let uint8Affine = QuantSpec(mode: .asymmetric)

    /// Largest quantized magnitude of the symmetric mode (127 for 8 bits).
    public var qmax: Int { (1 << (bits - 1)) - 1 }
    /// Largest code of the asymmetric mode (255 for 8 bits).
    public var levels: Int { (1 << bits) - 1 }

    public var description: String {
        "\(mode == .symmetric ? "int" : "uint")\(bits) \(axis.map { "per-channel(axis \($0))" } ?? "per-tensor")"
    }
}

/// Scale and zero point of the asymmetric mode for an observed range (the range is widened
/// to include 0 so that 0 is exactly representable, as every affine backend requires).
public func affineParameters(min lo: Float, max hi: Float, levels: Int) -> (scale: Float, zeroPoint: Int) {
    let lo = Swift.min(lo, 0), hi = Swift.max(hi, 0)
    guard hi > lo else { return (0, 0) }
    let scale = (hi - lo) / Float(levels)
    let zp = Int((-lo / scale).rounded(.toNearestOrEven))
    return (scale, Swift.min(Swift.max(zp, 0), levels))
}

/// Symmetric fake quantization with straight-through gradient. `amax` has one value (per
/// tensor) or one per index along `spec.axis`.
public func fakeQuantize(_ x: Tensor, amax: [Float], spec: QuantSpec) -> Tensor {
    require(spec.mode == .symmetric, "fakeQuantize(amax:) is the symmetric mode; use fakeQuantizeAffine")
    require(x.device == .cpu, "fakeQuantize: CPU tensors only (the CUDA plugin has the same kernels; dispatch is not wired)")
    let out = Tensor(zeros: x.shape)
    let qmax = Int32(spec.qmax)
    if let axis = spec.axis {
        require(axis >= 0 && axis < x.rank && amax.count == x.shape[axis],
                     "fakeQuantize: \(amax.count) amax values for axis \(axis) of shape \(x.shape)")
        let outer = x.shape[..<axis].reduce(1, *), inner = x.shape[(axis + 1)...].reduce(1, *)
        let channels = Int32(x.shape[axis])
        ql_fake_quant_per_channel_f32(out.data, x.data, Int64(outer), channels, Int64(inner), amax, qmax)
        traceOp(.quantizeDequantize(amax: amax, axis: axis, bits: spec.bits), [x], out)
        return record(out, "fake_quant_per_channel", [x]) { g in
            ql_fake_quant_per_channel_bwd_f32(x.gradBuffer().data, g.data, x.data, Int64(outer), channels, Int64(inner), amax)
        }
    }
    require(amax.count == 1, "fakeQuantize: per-tensor quantization takes one amax, got \(amax.count)")
    let a = amax[0]
    ql_fake_quant_f32(out.data, x.data, Int64(x.count), a, qmax)
    traceOp(.quantizeDequantize(amax: amax, axis: nil, bits: spec.bits), [x], out)
    return record(out, "fake_quant", [x]) { g in
        ql_fake_quant_bwd_f32(x.gradBuffer().data, g.data, x.data, Int64(x.count), a)
    }
}

/// Asymmetric (affine) fake quantization with straight-through gradient inside the range.
public func fakeQuantizeAffine(_ x: Tensor, scale: Float, zeroPoint: Int, levels: Int = 255) -> Tensor {
    require(x.device == .cpu, "fakeQuantizeAffine: CPU tensors only")
    let out = Tensor(zeros: x.shape)
    let (zp, hi) = (Int32(zeroPoint), Int32(levels))
    ql_fake_quant_affine_f32(out.data, x.data, Int64(x.count), scale, zp, 0, hi)
    traceOp(.unsupported("asymmetric fake quantization"), [x], out)
    return record(out, "fake_quant_affine", [x]) { g in
        ql_fake_quant_affine_bwd_f32(x.gradBuffer().data, g.data, x.data, Int64(x.count), scale, zp, 0, hi)
    }
}

/// Per-channel max |x| along `axis` (the weight calibrator of TensorRT and of the article).
public func channelAbsMax(_ x: Tensor, axis: Int) -> [Float] {
    require(axis >= 0 && axis < x.rank, "channelAbsMax: axis \(axis) out of range for shape \(x.shape)")
    let outer = x.shape[..<axis].reduce(1, *), inner = x.shape[(axis + 1)...].reduce(1, *)
    var amax = [Float](repeating: 0, count: x.shape[axis])
    ql_channel_absmax_f32(&amax, x.data, Int64(outer), Int32(x.shape[axis]), Int64(inner))
    return amax
}

/// Signal-to-quantization-noise ratio in dB: 10 log10(sum x^2 / sum (x - q)^2). Infinite
/// when the quantization is exact.
public func sqnr(_ x: Tensor, _ quantized: Tensor) -> Double {
    require(x.shape == quantized.shape, "sqnr: shapes \(x.shape) and \(quantized.shape) differ")
    var signal = 0.0, noise = 0.0
    for i in 0..<x.count {
        let v = Double(x.data[i]), d = v - Double(quantized.data[i])
        signal += v * v
        noise += d * d
    }
    return noise == 0 ? .infinity : 10 * Foundation.log10(signal / noise)
}
