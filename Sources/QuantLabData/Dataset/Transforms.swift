import CKernels
import Foundation
import QuantLabCore

/// One labelled object in image pixels. `crowd` objects are regions to ignore (COCO's
/// iscrowd): they are never positives in training and never false positives in evaluation.
public struct ObjectLabel: Equatable, Sendable {
    public var box: Box
    public var classIndex: Int
    public var crowd: Bool

    public init(box: Box, classIndex: Int, crowd: Bool = false) {
        self.box = box
        self.classIndex = classIndex
        self.crowd = crowd
    }
}

/// How a network input maps back to the original image: input = original * scale + pad.
public struct InputGeometry: Equatable, Sendable {
    public var scaleX: Double, scaleY: Double, padX: Double, padY: Double
    public var originalWidth: Int, originalHeight: Int

    /// A box in network-input pixels back in original-image pixels, clipped to the image.
    /// (A negative scale means the input was mirrored.)
    public func toOriginal(_ b: Box) -> Box {
        let xa = (b.x1 - padX) / scaleX, xb = (b.x2 - padX) / scaleX
        let ya = (b.y1 - padY) / scaleY, yb = (b.y2 - padY) / scaleY
        return Box(x1: min(xa, xb), y1: min(ya, yb), x2: max(xa, xb), y2: max(ya, yb))
            .clipped(width: Double(originalWidth), height: Double(originalHeight))
    }
}

/// The detection input pipeline: geometry (letterbox as YOLOv6, or plain resize as RT-DETR),
/// optional augmentation (random scale and translation, horizontal flip, HSV jitter), then
/// normalisation and HWC -> CHW. Boxes follow every geometric step; boxes that leave the
/// image or shrink below `minBoxSize` pixels are dropped.
public struct DetectionTransform: Sendable {
    public enum Resize: String, Codable, Sendable {
        /// Keep the aspect ratio and pad to a square with grey 114 (YOLOv5/v6).
        case letterbox
        /// Stretch to size x size, no padding (RT-DETR's reader).
        case stretch
    }

    public var size: Int
    public var resize: Resize
    public var augment: Bool
    /// Random zoom factor range (augmentation); 1...1 disables it.
    public var scaleRange: ClosedRange<Double> = 0.5...1.5
    /// Random translation as a fraction of the size (augmentation).
    public var translate: Double = 0.1
    public var flipProbability: Double = 0.5
    /// YOLOv6's hsv_h, hsv_s, hsv_v gains.
    public var hsvGains: (h: Double, s: Double, v: Double) = (0.015, 0.7, 0.4)
    /// pixel * scale + shift per channel: [0, 1] inputs by default, as YOLOv6 and RT-DETR.
    public var normalizeScale: [Float] = [1 / 255, 1 / 255, 1 / 255]
    public var normalizeShift: [Float] = [0, 0, 0]
    public var minBoxSize: Double = 2
    public var padValue: UInt8 = 114

    public init(size: Int, resize: Resize = .letterbox, augment: Bool = false) {
        require(size > 0, "input size \(size)")
        self.size = size
        self.resize = resize
        self.augment = augment
    }

    /// Where an image lands on the size x size input: its resized size and its offset.
    public struct Placement: Equatable, Sendable {
        public var width: Int, height: Int, offX: Int, offY: Int

        /// The geometry from the input back to an original of this size.
        public func geometry(originalWidth: Int, originalHeight: Int) -> InputGeometry {
            InputGeometry(scaleX: Double(width) / Double(originalWidth), scaleY: Double(height) / Double(originalHeight),
                          padX: Double(offX), padY: Double(offY), originalWidth: originalWidth, originalHeight: originalHeight)
        }
    }

    /// The placement of a width x height image: resized by the `resize` rule times `zoom`,
    /// centred, then shifted by (dx, dy) pixels (zoom and shift are the augmentation's).
    public func placement(width: Int, height: Int, zoom: Double = 1, dx: Double = 0, dy: Double = 0) -> Placement {
        var sx: Double, sy: Double
        switch resize {
        case .letterbox:
            let r = Double(size) / Double(max(width, height))
            (sx, sy) = (r, r)
        case .stretch:
            (sx, sy) = (Double(size) / Double(width), Double(size) / Double(height))
        }
        sx *= zoom
        sy *= zoom
        let newW = max(1, Int((Double(width) * sx).rounded())), newH = max(1, Int((Double(height) * sy).rounded()))
        return Placement(width: newW, height: newH, offX: Int(((Double(size - newW)) / 2 + dx).rounded()), offY: Int(((Double(size - newH)) / 2 + dy).rounded()))
    }

    /// The transformed input [3, size, size], its labels and the geometry back to the original.
    public func apply(_ image: RGBImage, labels: [ObjectLabel], rng: inout SeededGenerator) -> (Tensor, [ObjectLabel], InputGeometry) {
        let s = size
        var zoom = 1.0, dx = 0.0, dy = 0.0
        if augment {
            zoom = scaleRange.lowerBound + (scaleRange.upperBound - scaleRange.lowerBound) * Double(rng.nextFloat())
            dx = (Double(rng.nextFloat()) * 2 - 1) * translate * Double(s)
            dy = (Double(rng.nextFloat()) * 2 - 1) * translate * Double(s)
        }
        let p = placement(width: image.width, height: image.height, zoom: zoom, dx: dx, dy: dy)
        let (newW, newH, offX, offY) = (p.width, p.height, p.offX, p.offY)
        let resized = (newW == image.width && newH == image.height) ? image : image.resized(width: newW, height: newH)
        var canvas = RGBImage(width: s, height: s, fill: (padValue, padValue, padValue))
        paste(resized, into: &canvas, x: offX, y: offY)
        let geometry = p.geometry(originalWidth: image.width, originalHeight: image.height)
        let (realSX, realSY) = (geometry.scaleX, geometry.scaleY)
        var out: [ObjectLabel] = []
        for l in labels {
            let b = l.box.transformed(scaleX: realSX, scaleY: realSY, dx: Double(offX), dy: Double(offY)).clipped(width: Double(s), height: Double(s))
            if b.width >= minBoxSize && b.height >= minBoxSize { out.append(ObjectLabel(box: b, classIndex: l.classIndex, crowd: l.crowd)) }
        }
        var flip = false
        if augment {
            let gh = 1 + (Double(rng.nextFloat()) * 2 - 1) * hsvGains.h
            let gs = 1 + (Double(rng.nextFloat()) * 2 - 1) * hsvGains.s
            let gv = 1 + (Double(rng.nextFloat()) * 2 - 1) * hsvGains.v
            ql_hsv_jitter_u8(&canvas.pixels, Int64(s * s), Float(gh), Float(gs), Float(gv))
            flip = Double(rng.nextFloat()) < flipProbability
            if flip {
                out = out.map { ObjectLabel(box: Box(x1: Double(s) - $0.box.x2, y1: $0.box.y1, x2: Double(s) - $0.box.x1, y2: $0.box.y2),
                                            classIndex: $0.classIndex, crowd: $0.crowd) }
            }
        }
        let tensor = Tensor(zeros: [3, s, s])
        ql_u8hwc_to_f32chw(tensor.data, canvas.pixels, Int32(s), Int32(s), normalizeScale, normalizeShift, flip ? 1 : 0)
        return (tensor, out, flip ? InputGeometry(scaleX: -realSX, scaleY: realSY, padX: Double(s - offX), padY: Double(offY),
                                                  originalWidth: image.width, originalHeight: image.height) : geometry)
    }

    private func paste(_ src: RGBImage, into dst: inout RGBImage, x: Int, y: Int) {
        let x0 = max(0, x), x1 = min(dst.width, x + src.width)
        guard x0 < x1 else { return }
        for row in 0..<src.height {
            let ty = y + row
            if ty < 0 || ty >= dst.height { continue }
            let s = (row * src.width + (x0 - x)) * 3, d = (ty * dst.width + x0) * 3, n = (x1 - x0) * 3
            dst.pixels.replaceSubrange(d..<(d + n), with: src.pixels[s..<(s + n)])
        }
    }
}
