import CImageIO
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
    public var size: Int
    public var resize: DetectionTransform.Resize
    /// pixel * scale + shift per channel, as `DetectionTransform`.
    public var normalizeScale: [Float] = [1 / 255, 1 / 255, 1 / 255] { didSet { floatLUT = floatTable } }
    public var normalizeShift: [Float] = [0, 0, 0] { didSet { floatLUT = floatTable } }
    /// `floatTable`, kept (the fused pass reads it for every image).
    private var floatLUT: [Float] = []
    public var padValue: UInt8 = 114
    /// Largest DCT-domain reduction the fused pipeline may use (1 disables it; 8 is libjpeg's most).
    public var maxScaleDenominator = 8

    public init(_ pipeline: Pipeline, size: Int, resize: DetectionTransform.Resize = .letterbox) {
        require(size > 0, "input size \(size)")
        self.pipeline = pipeline
        self.size = size
        self.resize = resize
        floatLUT = floatTable
    }

    /// Seconds spent decoding and transforming one image.
    public struct Timing: Sendable {
        public var decode = 0.0, transform = 0.0
        public init() {}
    }

    /// Where the resized image lands on the canvas (no augmentation): `DetectionTransform`'s
    /// placement, so that boxes map back the same way.
    public func placement(width: Int, height: Int) -> (newWidth: Int, newHeight: Int, offX: Int, offY: Int) {
        let (sx, sy): (Double, Double)
        switch resize {
        case .letterbox:
            let r = Double(size) / Double(max(width, height))
            (sx, sy) = (r, r)
        case .stretch:
            (sx, sy) = (Double(size) / Double(width), Double(size) / Double(height))
        }
        let newW = max(1, Int((Double(width) * sx).rounded())), newH = max(1, Int((Double(height) * sy).rounded()))
        return (newW, newH, Int((Double(size - newW) / 2).rounded()), Int((Double(size - newH) / 2).rounded()))
    }

    /// The DCT scale denominator the fused pipeline uses for an image of this size.
    public func scaleDenominator(width: Int, height: Int) -> Int {
        let p = placement(width: width, height: height)
        for d in [8, 4, 2] where d <= maxScaleDenominator {
            if (width + d - 1) / d >= p.newWidth && (height + d - 1) / d >= p.newHeight { return d }
        }
        return 1
    }

    /// The geometry from the input back to the original image.
    func geometry(width: Int, height: Int) -> InputGeometry {
        let p = placement(width: width, height: height)
        return InputGeometry(scaleX: Double(p.newWidth) / Double(width), scaleY: Double(p.newHeight) / Double(height),
                             padX: Double(p.offX), padY: Double(p.offY), originalWidth: width, originalHeight: height)
    }

    /// One JPEG to [3, size, size] floats at `out` (3 * size * size of them). A corrupt or
    /// truncated file throws an `ImageError` naming `source`; nothing is written then.
    public func prepare(_ data: Data, source: String, into out: UnsafeMutablePointer<Float>, timing: inout Timing) throws -> InputGeometry {
        switch pipeline {
        case .baseline:
            let t0 = now()
            let image = try JPEG.decode(data, source: source)
            let t1 = now()
            var rng = SeededGenerator(seed: 0) // unused: no augmentation
            var transform = DetectionTransform(size: size, resize: resize)
            transform.normalizeScale = normalizeScale
            transform.normalizeShift = normalizeShift
            transform.padValue = padValue
            let (tensor, _, geometry) = transform.apply(image, labels: [], rng: &rng)
            out.update(from: tensor.data, count: tensor.count)
            timing.decode += t1 - t0
            timing.transform += now() - t1
            return geometry
        case .fused:
            return try fused(data, source: source, timing: &timing) { image, p in
                ql_letterbox_f32chw(out, Int32(size), Int32(size), image.pixels, image.height, image.width,
                                    Int32(p.newHeight), Int32(p.newWidth), Int32(p.offY), Int32(p.offX), padValue, floatLUT)
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
                                Int32(p.newHeight), Int32(p.newWidth), Int32(p.offY), Int32(p.offX), padValue, table)
        }
    }

    /// Per channel and byte value: the normalised value.
    public var floatTable: [Float] {
        (0..<768).map { i in Float(i % 256) * normalizeScale[i / 256] + normalizeShift[i / 256] }
    }

    /// Per channel and byte value: the int8 code of the normalised value under a symmetric
    /// quantizer of this amax, computed by the engine's own quantize kernel (same codes).
    public func codeTable(amax: Float) -> [Int8] {
        let values = floatTable
        var codes = [Int8](repeating: 0, count: 768)
        ql_quantize_s8(&codes, values, 768, amax, 127)
        return codes
    }

    /// The decoded image as the kernels see it.
    struct Decoded { var pixels: UnsafePointer<UInt8>; var width: Int32, height: Int32 }

    private func fused(_ data: Data, source: String, timing: inout Timing,
                       write: (Decoded, (newWidth: Int, newHeight: Int, offX: Int, offY: Int)) -> Int32) throws -> InputGeometry {
        let t0 = now()
        var w: Int32 = 0, h: Int32 = 0
        var err = [CChar](repeating: 0, count: 256)
        let sized = data.withUnsafeBytes { raw in qlio_jpeg_size(raw.bindMemory(to: UInt8.self).baseAddress, raw.count, &w, &h, &err, err.count) }
        guard sized == 0 else { throw ImageError("\(source): not a decodable JPEG (\(cMessage(err)))") }
        let p = placement(width: Int(w), height: Int(h))
        var t1 = 0.0
        let status = try JPEG.withDecoded(data, source: source, scaleDenominator: scaleDenominator(width: Int(w), height: Int(h))) { pixels, dw, dh in
            t1 = now()
            return write(Decoded(pixels: pixels, width: Int32(dw), height: Int32(dh)), p)
        }
        guard status == 0 else { throw ImageError("\(source): letterbox geometry \(p) does not fit \(size) x \(size)") }
        timing.decode += t1 - t0
        timing.transform += now() - t1
        return geometry(width: Int(w), height: Int(h))
    }

    private func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }
}
