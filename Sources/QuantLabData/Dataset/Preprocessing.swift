import CKernels
import Foundation
import QuantLabCore

/// Serving-time input pipelines: JPEG bytes to the network input, with no augmentation (exp06).
///
/// - `baseline` is what a plain Python/OpenCV server does, and what our evaluation uses: decode
///   the whole image, resize it, paste it on the padded canvas, then normalise and transpose to
///   CHW, each a separate pass over a separate buffer (`DetectionTransform.apply`).
/// - `fused` is DALI's idea on a CPU: decode straight to a fraction of the size in the DCT domain
///   (1/2, 1/4 or 1/8, the largest that is still at least the target size), then one pass that
///   resizes, pads, normalises and writes CHW floats (`ql_letterbox_f32chw`), or the INT8
///   engine's input codes directly (`ql_letterbox_s8nhwc`).
///
/// The two agree exactly when no DCT scaling applies (the fused kernel is value for value the
/// baseline's three passes); with DCT scaling the decoded image is a box-like low-pass of the
/// original instead of bilinear samples of it, so values differ (measured in PreprocessingTests).
public struct ServingPreprocessor: Sendable {
    public enum Pipeline: String, CaseIterable, Codable, Sendable { case baseline, fused }

    public var pipeline: Pipeline
    /// Geometry (size, letterbox or stretch, pad value) and normalisation: the evaluation
    /// transform's, without augmentation. The baseline pipeline is this transform.
    public var transform: DetectionTransform { didSet { floatTable = Self.table(transform) } }
    /// Per channel and byte value, the normalised value (read by the fused pass for every image).
    public private(set) var floatTable: [Float]
    /// Largest DCT-domain reduction the fused pipeline may use (1 disables it; 8 is libjpeg's most).
    public var maxScaleDenominator = 8

    public init(_ pipeline: Pipeline, size: Int, resize: DetectionTransform.Resize = .letterbox) {
        self.pipeline = pipeline
        transform = DetectionTransform(size: size, resize: resize)
        floatTable = Self.table(transform)
    }

    public var size: Int { transform.size }

    private static func table(_ t: DetectionTransform) -> [Float] {
        (0..<768).map { i in Float(i % 256) * t.normalizeScale[i / 256] + t.normalizeShift[i / 256] }
    }

    /// Seconds spent decoding and transforming one image.
    public struct Timing: Sendable {
        public var decode = 0.0, transform = 0.0
        public init() {}
    }

    /// The DCT scale denominator the fused pipeline uses for an image of this size: the largest
    /// whose decoded image is still at least the placed size both ways.
    public func scaleDenominator(width: Int, height: Int) -> Int {
        let p = transform.placement(width: width, height: height)
        for d in [8, 4, 2] where d <= maxScaleDenominator {
            if (width + d - 1) / d >= p.width && (height + d - 1) / d >= p.height { return d }
        }
        return 1
    }

    /// One JPEG to [3, size, size] floats at `out` (3 * size * size of them). A corrupt or
    /// truncated file throws an `ImageError` naming `source`; nothing is written then.
    public func prepare(_ data: Data, source: String, into out: UnsafeMutablePointer<Float>, timing: inout Timing) throws -> InputGeometry {
        switch pipeline {
        case .baseline:
            var clock = Stopwatch()
            let image = try JPEG.decode(data, source: source)
            let decode = clock.lap()
            var rng = SeededGenerator(seed: 0) // unused: no augmentation
            let (tensor, _, geometry) = transform.apply(image, labels: [], rng: &rng)
            out.update(from: tensor.data, count: tensor.count)
            timing.decode += decode
            timing.transform += clock.lap()
            return geometry
        case .fused:
            return try fused(data, source: source, timing: &timing) { image, p in
                ql_letterbox_f32chw(out, Int32(size), Int32(size), image.pixels, image.height, image.width,
                                    Int32(p.height), Int32(p.width), Int32(p.offY), Int32(p.offX), transform.padValue, floatTable)
            }
        }
    }

    /// One JPEG straight to the INT8 engine's input: codes NHWC [size, size, 3] at `out`, of
    /// the normalised values quantized with `amax` (the plan's `inputAmax`), through
    /// `table` = `codeTable(amax:)`. Fused pipeline only (the baseline produces floats).
    public func prepareCodes(_ data: Data, source: String, table: [Int8], into out: UnsafeMutablePointer<Int8>, timing: inout Timing) throws -> InputGeometry {
        require(table.count == 768, "code table has \(table.count) entries, expected 3 x 256")
        return try fused(data, source: source, timing: &timing) { image, p in
            ql_letterbox_s8nhwc(out, Int32(size), Int32(size), image.pixels, image.height, image.width,
                                Int32(p.height), Int32(p.width), Int32(p.offY), Int32(p.offX), transform.padValue, table)
        }
    }

    /// Per channel and byte value: the int8 code of the normalised value under a symmetric
    /// quantizer of this amax, computed by the engine's own quantize kernel (same codes).
    public func codeTable(amax: Float) -> [Int8] {
        var codes = [Int8](repeating: 0, count: 768)
        ql_quantize_s8(&codes, floatTable, 768, amax, 127)
        return codes
    }

    /// The decoded image as the kernels see it.
    struct Decoded { var pixels: UnsafePointer<UInt8>; var width: Int32, height: Int32 }

    private func fused(_ data: Data, source: String, timing: inout Timing,
                       write: (Decoded, DetectionTransform.Placement) -> Int32) throws -> InputGeometry {
        var clock = Stopwatch()
        let (w, h) = try JPEG.size(of: data, source: source)
        let p = transform.placement(width: w, height: h)
        var decode = 0.0
        let status = try JPEG.withDecoded(data, source: source, scaleDenominator: scaleDenominator(width: w, height: h)) { pixels, dw, dh in
            decode = clock.lap()
            return write(Decoded(pixels: pixels, width: Int32(dw), height: Int32(dh)), p)
        }
        guard status == 0 else { throw ImageError("\(source): letterbox geometry \(p) does not fit \(size) x \(size)") }
        timing.decode += decode
        timing.transform += clock.lap()
        return p.geometry(originalWidth: w, originalHeight: h)
    }
}
