import Foundation
import QuantLabCore
import QuantLabData
import QuantLabModels
import QuantLabQuant

// Rendering of the quantization layer's results: the library computes (QuantLabQuant), this
// layer draws tables and figures of what it computed.

extension LayerAnalysis {
    /// The per-layer table of the analysis report.
    public static func markdownTable(_ layers: [LayerAnalysis]) -> String {
        func f(_ v: Double) -> String {
            if v.isInfinite { return "∞" }
            return abs(v) >= 100 || (abs(v) < 0.01 && v != 0) ? String(format: "%.3g", v) : String(format: "%.3f", v)
        }
        let methods = layers.first.map { Array($0.activationAmax.keys).sorted() } ?? []
        let header = ["layer", "kind", "weight std", "weight kurtosis", "weight >3σ", "weight SQNR/ch dB", "weight SQNR/tensor dB",
                      "act min", "act max", "act std", "act kurtosis", "act >3σ"] + methods.map { "amax \($0)" }
        let rows = layers.map { l in
            // an operand of a product of two activations has no weight
            [l.name, l.kind] + (l.weightShape.isEmpty ? Array(repeating: "—", count: 5) :
                [f(l.weight.std), f(l.weight.kurtosis), String(format: "%.2f%%", 100 * l.weight.beyond3Sigma),
                 String(format: "%.1f", l.weightSQNRPerChannel), String(format: "%.1f", l.weightSQNRPerTensor)]) +
            [f(l.activation.min), f(l.activation.max), f(l.activation.std), f(l.activation.kurtosis),
             String(format: "%.2f%%", 100 * l.activation.beyond3Sigma)] + methods.map { f(l.activationAmax[$0] ?? .nan) }
        }
        return QuantLabReport.markdownTable(header, rows)
    }

    /// Weight and input-activation histograms of one layer, side by side.
    public var figure: String {
        SVG.histograms((weightShape.isEmpty ? [] : [(title: "weight (fused)", histogram: weightHistogram)]) + [(title: "input activation", histogram: activationHistogram)],
                       title: name, xLabel: "value")
    }
}

extension SensitivityReport {
    /// The per-layer table: each metric's value and the layer's rank under it.
    public var markdown: String {
        let metrics = SensitivityMetric.allCases.filter { m in layers.contains { m.sensitivity($0, fp32mAP: fp32mAP) != nil } }
        let rank = Dictionary(uniqueKeysWithValues: metrics.map { m in (m, Dictionary(uniqueKeysWithValues: ranking(by: m).enumerated().map { ($0.element, $0.offset + 1) })) })
        let header = ["layer", "kind", "MSE", "SNR", "cosine"] + (metrics.contains(.map) ? ["mAP (only this layer INT8)"] : [])
            + metrics.map { "rank \($0.label)" }
        let rows = layers.map { l -> [String] in
            [l.name, l.kind, String(format: "%.3e", l.mse), String(format: "%.3e", l.snr), String(format: "%.6f", l.cosine)]
                + (metrics.contains(.map) ? [l.mAP.map { String(format: "%.4f", $0) } ?? "—"] : [])
                + metrics.map { m in rank[m]?[l.name].map(String.init) ?? "—" }
        }
        return markdownTable(header, rows)
    }
}
