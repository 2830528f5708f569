/// Drawing boxes on images, so a person can see what a detector does.
import QuantLabCore
import QuantLabData
import QuantLabModels
import QuantLabQuant

public enum Draw {
    /// A distinct colour per class index (golden-angle hues).
    public static func color(for classIndex: Int) -> (UInt8, UInt8, UInt8) {
        let h = (Double(classIndex) * 137.508).truncatingRemainder(dividingBy: 360) / 60
        let x = 1 - abs(h.truncatingRemainder(dividingBy: 2) - 1)
        let (r, g, b): (Double, Double, Double)
        switch Int(h) {
        case 0: (r, g, b) = (1, x, 0)
        case 1: (r, g, b) = (x, 1, 0)
        case 2: (r, g, b) = (0, 1, x)
        case 3: (r, g, b) = (0, x, 1)
        case 4: (r, g, b) = (x, 0, 1)
        default: (r, g, b) = (1, 0, x)
        }
        return (UInt8(55 + 200 * r), UInt8(55 + 200 * g), UInt8(55 + 200 * b))
    }

    /// Rectangle outline; `dashed` for predictions, solid for ground truth.
    public static func rectangle(_ image: inout RGBImage, _ box: Box, color: (UInt8, UInt8, UInt8), thickness: Int = 1, dashed: Bool = false) {
        let (w, h) = (image.width, image.height)
        let x1 = Int(box.x1.rounded()), y1 = Int(box.y1.rounded()), x2 = Int(box.x2.rounded()) - 1, y2 = Int(box.y2.rounded()) - 1
        func put(_ x: Int, _ y: Int, _ along: Int) {
            guard x >= 0, x < w, y >= 0, y < h, !dashed || (along / 3) % 2 == 0 else { return }
            let i = (y * w + x) * 3
            image.pixels[i] = color.0
            image.pixels[i + 1] = color.1
            image.pixels[i + 2] = color.2
        }
        for t in 0..<thickness {
            if x1 <= x2 { for x in x1...x2 { put(x, y1 + t, x); put(x, y2 - t, x) } }
            if y1 <= y2 { for y in y1...y2 { put(x1 + t, y, y); put(x2 - t, y, y) } }
        }
    }

    /// Ground truth (solid) and detections (dashed, only those scoring >= minScore), each in
    /// its class colour.
    public static func overlay(_ image: RGBImage, groundTruth: [(Box, Int)], detections: [Detection] = [], minScore: Double = 0.3) -> RGBImage {
        var out = image
        for (box, cls) in groundTruth { rectangle(&out, box, color: color(for: cls)) }
        for d in detections where d.score >= minScore { rectangle(&out, d.box, color: color(for: d.classIndex), thickness: 2, dashed: true) }
        return out
    }

    /// Images side by side in a grid (all the same size), `columns` wide.
    public static func grid(_ images: [RGBImage], columns: Int, gap: Int = 4) -> RGBImage {
        require(!images.isEmpty && images.allSatisfy { $0.width == images[0].width && $0.height == images[0].height }, "grid needs images of one size")
        let (w, h) = (images[0].width, images[0].height), rows = (images.count + columns - 1) / columns
        var out = RGBImage(width: columns * (w + gap) - gap, height: rows * (h + gap) - gap, fill: (255, 255, 255))
        for (k, im) in images.enumerated() {
            let ox = (k % columns) * (w + gap), oy = (k / columns) * (h + gap)
            for y in 0..<h {
                let dst = ((oy + y) * out.width + ox) * 3
                out.pixels.replaceSubrange(dst..<(dst + w * 3), with: im.pixels[(y * w * 3)..<((y + 1) * w * 3)])
            }
        }
        return out
    }
}
