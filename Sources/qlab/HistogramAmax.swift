import ArgumentParser
import Foundation
import QuantLab

struct HistogramAmax: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "histogram-amax",
        abstract: "The amax each histogram calibrator picks for a saved |x| histogram (prints JSON).",
        discussion: """
        FILE is JSON {"counts": [n0, n1, ...], "bin_width": w}: a histogram of |x| with bins [i*w, (i+1)*w). \
        Prints {"entropy": ..., "mse": ..., "percentile-99.99": ...}. `make crosscheck` uses it to compare our \
        calibrators with an independent numpy implementation of pytorch-quantization's algorithms.
        """)

    @Argument(help: "Histogram JSON file.") var file: String
    @Option(help: "Calibrators, comma-separated (entropy, mse, percentile-<p>).") var methods = "entropy,mse,percentile-99.99,percentile-99.9"

    struct Input: Decodable {
        let counts: [Int64]
        let bin_width: Float
    }

    func run() throws {
        let url = URL(fileURLWithPath: file)
        let data: Data
        do { data = try Data(contentsOf: url) } catch { throw ValidationError("\(file): cannot read (\(error.localizedDescription))") }
        let input: Input
        do { input = try JSONDecoder().decode(Input.self, from: data) } catch { throw ValidationError("\(file): expected {\"counts\": [...], \"bin_width\": w} (\(error))") }
        guard input.counts.count >= 2, input.bin_width > 0, input.counts.allSatisfy({ $0 >= 0 }), input.counts.contains(where: { $0 > 0 }) else {
            throw ValidationError("\(file): need at least 2 bins, non-negative counts (not all zero) and bin_width > 0")
        }
        let h = AbsHistogram(counts: input.counts, binWidth: input.bin_width)
        var out: [String: Double] = [:]
        for name in methods.split(separator: ",").map({ String($0).trimmingCharacters(in: .whitespaces) }) {
            let method = try CalibrationMethod(parsing: name)
            switch method {
            case .entropy: out[name] = h.entropyAmax().map(Double.init)
            case .mse: out[name] = h.mseAmax().map(Double.init)
            case .percentile(let p): out[name] = h.percentileAmax(p).map(Double.init)
            default: throw ValidationError("--methods: \(name) does not read a histogram")
            }
        }
        let encoded = try JSONSerialization.data(withJSONObject: out, options: [.sortedKeys])
        print(String(decoding: encoded, as: UTF8.self))
    }
}
