import CImageIO
import CKernels
import Foundation
import QuantLabCore

/// Errors about image files: they name the file and what is wrong with it.
public struct ImageError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// An 8-bit RGB image, rows of `width * 3` bytes (HWC), top row first.
public struct RGBImage: Equatable, Sendable {
    public let width: Int, height: Int
    public var pixels: [UInt8]

    public init(width: Int, height: Int, pixels: [UInt8]) {
        require(width > 0 && height > 0 && pixels.count == width * height * 3,
                     "RGBImage \(width)x\(height) needs \(width * height * 3) bytes, got \(pixels.count)")
        self.width = width
        self.height = height
        self.pixels = pixels
    }

    public init(width: Int, height: Int, fill: (UInt8, UInt8, UInt8) = (0, 0, 0)) {
        require(width > 0 && height > 0, "RGBImage size \(width)x\(height)")
        self.width = width
        self.height = height
        var p = [UInt8](repeating: 0, count: width * height * 3)
        for i in 0..<(width * height) { p[3 * i] = fill.0; p[3 * i + 1] = fill.1; p[3 * i + 2] = fill.2 }
        pixels = p
    }

    /// Bilinear resize (half-pixel centres, as OpenCV's INTER_LINEAR).
    public func resized(width w: Int, height h: Int) -> RGBImage {
        require(w > 0 && h > 0, "resize to \(w)x\(h)")
        var out = [UInt8](repeating: 0, count: w * h * 3)
        ql_resize_bilinear_u8(&out, Int32(h), Int32(w), pixels, Int32(height), Int32(width), 3)
        return RGBImage(width: w, height: h, pixels: out)
    }
}

/// JPEG through libjpeg-turbo. A corrupt or truncated file is a thrown error naming the
/// file and libjpeg's reason, never a crash and never a silently grey image.
public enum JPEG {
    public static func decode(_ data: Data, source: String = "<memory>") throws -> RGBImage {
        try decode(data, source: source, chromaUpsampling: .fancy)
    }

    /// How subsampled chroma is brought to full resolution: libjpeg's default triangle filter
    /// ("fancy", what our data pipeline uses), or each sample replicated ("replicate").
    public enum ChromaUpsampling: Sendable { case fancy, replicate }

    public static func decode(_ data: Data, source: String, chromaUpsampling: ChromaUpsampling) throws -> RGBImage {
        try decode(data, source: source, chromaUpsampling: chromaUpsampling, scaleDenominator: 1)
    }

    /// Decoded at 1/`scaleDenominator` of the size (1, 2, 4 or 8) in the DCT domain: the size
    /// is ceil(width / d) x ceil(height / d), and the full-size image is never built.
    public static func decode(_ data: Data, source: String, chromaUpsampling: ChromaUpsampling = .fancy, scaleDenominator: Int) throws -> RGBImage {
        try withDecoded(data, source: source, chromaUpsampling: chromaUpsampling, scaleDenominator: scaleDenominator) { rgb, w, h in
            RGBImage(width: w, height: h, pixels: Array(UnsafeBufferPointer(start: rgb, count: w * h * 3)))
        }
    }

    /// Decodes at 1/`scaleDenominator` of the size and lends the pixels (HWC, rows packed) to
    /// `body` without copying them into an `RGBImage`: the serving pipeline's decode.
    public static func withDecoded<T>(_ data: Data, source: String, chromaUpsampling: ChromaUpsampling = .fancy, scaleDenominator: Int,
                                      _ body: (UnsafePointer<UInt8>, _ width: Int, _ height: Int) throws -> T) throws -> T {
        require([1, 2, 4, 8].contains(scaleDenominator), "JPEG scale denominator must be 1, 2, 4 or 8, got \(scaleDenominator)")
        var rgb: UnsafeMutablePointer<UInt8>?
        var w: Int32 = 0, h: Int32 = 0
        var err = [CChar](repeating: 0, count: 256)
        let status = data.withUnsafeBytes { raw in
            qlio_jpeg_decode_scaled(raw.bindMemory(to: UInt8.self).baseAddress, raw.count, chromaUpsampling == .fancy ? 1 : 0,
                                    Int32(scaleDenominator), &rgb, &w, &h, &err, err.count)
        }
        guard status == 0, let rgb else { throw ImageError("\(source): not a decodable JPEG (\(cMessage(err)))") }
        defer { qlio_free(rgb) }
        return try body(rgb, Int(w), Int(h))
    }

    public static func read(_ url: URL) throws -> RGBImage {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw ImageError("\(url.path): cannot read image (\(error.localizedDescription))")
        }
        return try decode(data, source: url.path)
    }

    /// Width and height from the header alone.
    public static func size(of url: URL) throws -> (width: Int, height: Int) {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw ImageError("\(url.path): cannot read image (\(error.localizedDescription))")
        }
        return try size(of: data, source: url.path)
    }

    /// Width and height of a JPEG in memory, from its header alone.
    public static func size(of data: Data, source: String) throws -> (width: Int, height: Int) {
        var w: Int32 = 0, h: Int32 = 0
        var err = [CChar](repeating: 0, count: 256)
        let status = data.withUnsafeBytes { raw in
            qlio_jpeg_size(raw.bindMemory(to: UInt8.self).baseAddress, raw.count, &w, &h, &err, err.count)
        }
        guard status == 0 else { throw ImageError("\(source): not a JPEG (\(cMessage(err)))") }
        return (Int(w), Int(h))
    }

    /// Chroma sampling of an encoded JPEG: 4:2:0 (chroma at half resolution both ways, what
    /// cameras, COCO and our datasets use) or 4:4:4 (full resolution).
    public enum Chroma: Sendable { case subsampled420, full444 }

    public static func encode(_ image: RGBImage, quality: Int = 90, chroma: Chroma = .subsampled420) throws -> Data {
        var out: UnsafeMutablePointer<UInt8>?
        var size = 0
        var err = [CChar](repeating: 0, count: 256)
        let status = qlio_jpeg_encode(image.pixels, Int32(image.width), Int32(image.height), Int32(quality),
                                      chroma == .subsampled420 ? 1 : 0, &out, &size, &err, err.count)
        guard status == 0, let out else { throw ImageError("JPEG encode failed (\(cMessage(err)))") }
        defer { qlio_free(out) }
        return Data(bytes: out, count: size)
    }

    /// Encodes and writes atomically.
    public static func write(_ image: RGBImage, to url: URL, quality: Int = 90) throws {
        try AtomicFile.write(encode(image, quality: quality), to: url)
    }
}

/// A NUL-terminated C message buffer as a String.
func cMessage(_ buffer: [CChar]) -> String {
    let bytes = buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }
    return String(decoding: bytes, as: UTF8.self)
}
