import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels
import QuantLabQuant

// Small, dependency-free SVG figures for the results pages: histograms side by side and
// line charts over layers. Plain SVG 1.1, readable in any browser and on GitHub.

public enum SVG {
    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]

    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    static func num(_ v: Double) -> String { String(format: "%.1f", v) }

    static func tick(_ v: Double) -> String {
        let a = abs(v)
        if a == 0 { return "0" }
        if a >= 1000 || a < 0.01 { return String(format: "%.1e", v) }
        if a >= 10 { return String(format: "%.0f", v) }
        return String(format: "%.2g", v)
    }

    /// One panel per histogram, side by side, each with its own x range (so ranges can be
    /// compared by reading the axes, as in the article's Fig. 2). `logScale` plots log10(1 + count).
    public static func histograms(_ panels: [(title: String, histogram: RangeHistogram)], title: String, xLabel: String,
                                  logScale: Bool = true, panelWidth: Double = 300, height: Double = 230) -> String {
        let margin = (left: 46.0, right: 12.0, top: 44.0, bottom: 40.0)
        let width = Double(panels.count) * panelWidth
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(num(width))\" height=\"\(num(height))\" font-family=\"sans-serif\" font-size=\"11\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"\(num(width / 2))\" y=\"16\" text-anchor=\"middle\" font-size=\"13\">\(escape(title))</text>\n"
        for (k, panel) in panels.enumerated() {
            let x0 = Double(k) * panelWidth + margin.left, x1 = Double(k + 1) * panelWidth - margin.right
            let y0 = margin.top, y1 = height - margin.bottom
            let h = panel.histogram
            let values = h.counts.map { logScale ? Foundation.log10(1 + Double($0)) : Double($0) }
            let top = Swift.max(values.max() ?? 1, 1e-9)
            let barWidth = (x1 - x0) / Double(Swift.max(values.count, 1))
            s += "<text x=\"\(num((x0 + x1) / 2))\" y=\"34\" text-anchor=\"middle\">\(escape(panel.title))</text>\n"
            s += "<rect x=\"\(num(x0))\" y=\"\(num(y0))\" width=\"\(num(x1 - x0))\" height=\"\(num(y1 - y0))\" fill=\"none\" stroke=\"#888\"/>\n"
            for (i, v) in values.enumerated() where v > 0 {
                let bh = (y1 - y0) * v / top
                s += "<rect x=\"\(num(x0 + Double(i) * barWidth))\" y=\"\(num(y1 - bh))\" width=\"\(num(Swift.max(barWidth, 0.6)))\" height=\"\(num(bh))\" fill=\"\(palette[k % palette.count])\"/>\n"
            }
            for (frac, anchor) in [(0.0, "start"), (0.5, "middle"), (1.0, "end")] {
                let v = h.lo + frac * (h.hi - h.lo)
                s += "<text x=\"\(num(x0 + frac * (x1 - x0)))\" y=\"\(num(y1 + 14))\" text-anchor=\"\(anchor)\">\(tick(v))</text>\n"
            }
            s += "<text x=\"\(num((x0 + x1) / 2))\" y=\"\(num(y1 + 30))\" text-anchor=\"middle\" fill=\"#555\">\(escape(xLabel))</text>\n"
            s += "<text x=\"\(num(x0 - 6))\" y=\"\(num(y0 + 4))\" text-anchor=\"end\" fill=\"#555\">\(logScale ? "log" : "n")</text>\n"
        }
        return s + "</svg>\n"
    }

    /// Lines over a shared x axis (e.g. one point per layer), one series per entry.
    public static func lines(_ series: [(name: String, values: [Double])], xLabels: [String], title: String, yLabel: String,
                             logY: Bool = false, width: Double = 900, height: Double = 340) -> String {
        let margin = (left: 60.0, right: 150.0, top: 34.0, bottom: 110.0)
        let (x0, x1, y0, y1) = (margin.left, width - margin.right, margin.top, height - margin.bottom)
        func ty(_ v: Double) -> Double { logY ? Foundation.log10(Swift.max(v, 1e-12)) : v }
        let all = series.flatMap { $0.values }.filter { $0.isFinite }.map(ty)
        var (lo, hi) = (all.min() ?? 0, all.max() ?? 1)
        if hi <= lo { hi = lo + 1 }
        if !logY { lo = Swift.min(lo, 0) }
        let n = Swift.max(xLabels.count, series.map(\.values.count).max() ?? 1)
        func px(_ i: Int) -> Double { n == 1 ? (x0 + x1) / 2 : x0 + Double(i) * (x1 - x0) / Double(n - 1) }
        func py(_ v: Double) -> Double { y1 - (ty(v) - lo) / (hi - lo) * (y1 - y0) }
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(num(width))\" height=\"\(num(height))\" font-family=\"sans-serif\" font-size=\"10\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"\(num((x0 + x1) / 2))\" y=\"18\" text-anchor=\"middle\" font-size=\"13\">\(escape(title))</text>\n"
        s += "<rect x=\"\(num(x0))\" y=\"\(num(y0))\" width=\"\(num(x1 - x0))\" height=\"\(num(y1 - y0))\" fill=\"none\" stroke=\"#888\"/>\n"
        for frac in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let v = lo + frac * (hi - lo), y = y1 - frac * (y1 - y0)
            s += "<line x1=\"\(num(x0))\" y1=\"\(num(y))\" x2=\"\(num(x1))\" y2=\"\(num(y))\" stroke=\"#eee\"/>\n"
            s += "<text x=\"\(num(x0 - 4))\" y=\"\(num(y + 3))\" text-anchor=\"end\">\(tick(logY ? Foundation.pow(10, v) : v))</text>\n"
        }
        s += "<text transform=\"translate(14,\(num((y0 + y1) / 2))) rotate(-90)\" text-anchor=\"middle\" fill=\"#555\">\(escape(yLabel))</text>\n"
        for (i, label) in xLabels.enumerated() {
            s += "<text transform=\"translate(\(num(px(i))),\(num(y1 + 6))) rotate(60)\" font-size=\"7\">\(escape(label))</text>\n"
        }
        for (k, line) in series.enumerated() {
            let colour = palette[k % palette.count]
            let pts = line.values.enumerated().filter { $0.element.isFinite }.map { "\(num(px($0.offset))),\(num(py($0.element)))" }
            s += "<polyline fill=\"none\" stroke=\"\(colour)\" stroke-width=\"1.5\" points=\"\(pts.joined(separator: " "))\"/>\n"
            let ly = y0 + 14 * Double(k) + 6
            s += "<line x1=\"\(num(x1 + 10))\" y1=\"\(num(ly))\" x2=\"\(num(x1 + 28))\" y2=\"\(num(ly))\" stroke=\"\(colour)\" stroke-width=\"2\"/>\n"
            s += "<text x=\"\(num(x1 + 32))\" y=\"\(num(ly + 3))\">\(escape(line.name))</text>\n"
        }
        return s + "</svg>\n"
    }

    /// Stacked bars: one bar per label, its segments (in `segmentNames` order) stacked from 0.
    public static func stackedBars(_ bars: [(label: String, segments: [Double])], segmentNames: [String], title: String, yLabel: String,
                                   width: Double = 760, height: Double = 340) -> String {
        let margin = (left: 60.0, right: 150.0, top: 34.0, bottom: 90.0)
        let (x0, x1, y0, y1) = (margin.left, width - margin.right, margin.top, height - margin.bottom)
        let hi = Swift.max(bars.map { $0.segments.filter(\.isFinite).reduce(0, +) }.max() ?? 1, 1e-12)
        func py(_ v: Double) -> Double { y1 - v / hi * (y1 - y0) }
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(num(width))\" height=\"\(num(height))\" font-family=\"sans-serif\" font-size=\"10\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"\(num((x0 + x1) / 2))\" y=\"18\" text-anchor=\"middle\" font-size=\"13\">\(escape(title))</text>\n"
        for frac in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let y = y1 - frac * (y1 - y0)
            s += "<line x1=\"\(num(x0))\" y1=\"\(num(y))\" x2=\"\(num(x1))\" y2=\"\(num(y))\" stroke=\"#eee\"/>\n"
            s += "<text x=\"\(num(x0 - 4))\" y=\"\(num(y + 3))\" text-anchor=\"end\">\(tick(frac * hi))</text>\n"
        }
        s += "<text transform=\"translate(14,\(num((y0 + y1) / 2))) rotate(-90)\" text-anchor=\"middle\" fill=\"#555\">\(escape(yLabel))</text>\n"
        let slot = (x1 - x0) / Double(Swift.max(bars.count, 1))
        for (i, bar) in bars.enumerated() {
            var base = 0.0
            let bx = x0 + Double(i) * slot + slot * 0.2
            for (k, v) in bar.segments.enumerated() where v.isFinite && v > 0 {
                s += "<rect x=\"\(num(bx))\" y=\"\(num(py(base + v)))\" width=\"\(num(slot * 0.6))\" height=\"\(num(py(base) - py(base + v)))\" fill=\"\(palette[k % palette.count])\"/>\n"
                base += v
            }
            s += "<text transform=\"translate(\(num(bx + slot * 0.3)),\(num(y1 + 8))) rotate(30)\" font-size=\"8\">\(escape(bar.label))</text>\n"
        }
        for (k, name) in segmentNames.enumerated() {
            let ly = y0 + 14 * Double(k) + 6
            s += "<rect x=\"\(num(x1 + 10))\" y=\"\(num(ly - 5))\" width=\"12\" height=\"10\" fill=\"\(palette[k % palette.count])\"/>\n"
            s += "<text x=\"\(num(x1 + 26))\" y=\"\(num(ly + 3))\">\(escape(name))</text>\n"
        }
        return s + "</svg>\n"
    }

    /// Points in the plane, one series each (joined in the given order when `connect`), and a
    /// dashed front through `front` (e.g. the Pareto front), drawn over them.
    public static func scatter(_ series: [(name: String, points: [(x: Double, y: Double)], connect: Bool)], front: [(x: Double, y: Double)] = [],
                               frontName: String = "Pareto front", title: String, xLabel: String, yLabel: String,
                               width: Double = 760, height: Double = 400) -> String {
        let margin = (left: 64.0, right: 190.0, top: 34.0, bottom: 50.0)
        let (x0, x1, y0, y1) = (margin.left, width - margin.right, margin.top, height - margin.bottom)
        let all = (series.flatMap(\.points) + front).filter { $0.x.isFinite && $0.y.isFinite }
        func padded(_ v: [Double]) -> (Double, Double) {
            var (lo, hi) = (v.min() ?? 0, v.max() ?? 1)
            if hi <= lo { (lo, hi) = (lo - 0.5, hi + 0.5) }
            let pad = 0.06 * (hi - lo)
            return (lo - pad, hi + pad)
        }
        let (xl, xh) = padded(all.map(\.x)), (yl, yh) = padded(all.map(\.y))
        func px(_ v: Double) -> Double { x0 + (v - xl) / (xh - xl) * (x1 - x0) }
        func py(_ v: Double) -> Double { y1 - (v - yl) / (yh - yl) * (y1 - y0) }
        var s = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(num(width))\" height=\"\(num(height))\" font-family=\"sans-serif\" font-size=\"10\">\n"
        s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        s += "<text x=\"\(num((x0 + x1) / 2))\" y=\"18\" text-anchor=\"middle\" font-size=\"13\">\(escape(title))</text>\n"
        s += "<rect x=\"\(num(x0))\" y=\"\(num(y0))\" width=\"\(num(x1 - x0))\" height=\"\(num(y1 - y0))\" fill=\"none\" stroke=\"#888\"/>\n"
        for frac in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let vy = yl + frac * (yh - yl), vx = xl + frac * (xh - xl)
            s += "<line x1=\"\(num(x0))\" y1=\"\(num(py(vy)))\" x2=\"\(num(x1))\" y2=\"\(num(py(vy)))\" stroke=\"#eee\"/>\n"
            s += "<text x=\"\(num(x0 - 4))\" y=\"\(num(py(vy) + 3))\" text-anchor=\"end\">\(tick(vy))</text>\n"
            s += "<text x=\"\(num(px(vx)))\" y=\"\(num(y1 + 14))\" text-anchor=\"middle\">\(tick(vx))</text>\n"
        }
        s += "<text x=\"\(num((x0 + x1) / 2))\" y=\"\(num(y1 + 32))\" text-anchor=\"middle\" fill=\"#555\">\(escape(xLabel))</text>\n"
        s += "<text transform=\"translate(14,\(num((y0 + y1) / 2))) rotate(-90)\" text-anchor=\"middle\" fill=\"#555\">\(escape(yLabel))</text>\n"
        for (k, line) in series.enumerated() {
            let colour = palette[k % palette.count]
            let pts = line.points.filter { $0.x.isFinite && $0.y.isFinite }
            if line.connect, pts.count > 1 {
                s += "<polyline fill=\"none\" stroke=\"\(colour)\" stroke-width=\"1.2\" points=\"\(pts.map { "\(num(px($0.x))),\(num(py($0.y)))" }.joined(separator: " "))\"/>\n"
            }
            for p in pts { s += "<circle cx=\"\(num(px(p.x)))\" cy=\"\(num(py(p.y)))\" r=\"3.5\" fill=\"\(colour)\"/>\n" }
            let ly = y0 + 14 * Double(k) + 6
            s += "<circle cx=\"\(num(x1 + 18))\" cy=\"\(num(ly))\" r=\"3.5\" fill=\"\(colour)\"/>\n"
            s += "<text x=\"\(num(x1 + 28))\" y=\"\(num(ly + 3))\">\(escape(line.name))</text>\n"
        }
        let fpts = front.filter { $0.x.isFinite && $0.y.isFinite }.sorted { $0.x < $1.x }
        if !fpts.isEmpty {
            s += "<polyline fill=\"none\" stroke=\"#000\" stroke-dasharray=\"4 3\" stroke-width=\"1\" points=\"\(fpts.map { "\(num(px($0.x))),\(num(py($0.y)))" }.joined(separator: " "))\"/>\n"
            for p in fpts { s += "<circle cx=\"\(num(px(p.x)))\" cy=\"\(num(py(p.y)))\" r=\"6\" fill=\"none\" stroke=\"#000\"/>\n" }
            let ly = y0 + 14 * Double(series.count) + 6
            s += "<line x1=\"\(num(x1 + 10))\" y1=\"\(num(ly))\" x2=\"\(num(x1 + 26))\" y2=\"\(num(ly))\" stroke=\"#000\" stroke-dasharray=\"4 3\"/>\n"
            s += "<text x=\"\(num(x1 + 28))\" y=\"\(num(ly + 3))\">\(escape(frontName))</text>\n"
        }
        return s + "</svg>\n"
    }

    /// Writes an SVG atomically.
    public static func write(_ svg: String, to url: URL) throws {
        try AtomicFile.write(Data(svg.utf8), to: url)
    }
}
