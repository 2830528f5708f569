// exp00 — FP32 baselines: the models every quantization experiment starts from.
//
// Claim (CLAIMS.md, A3): YOLOv6s trained with RepVGG blocks and with RepOpt reaches the same
// FP32 accuracy, 42.4 COCO mAP for both (Meituan's article); RepOpt-VGG-B1 78.47% ImageNet
// top-1 (RepOpt paper). The quantization results (exp02 on) only mean something if the FP32
// starting points are equal, so this experiment checks that first, for the detector with
// RepVGG, QARepVGG and RepOpt blocks, and for the classifier with RepVGG and RepOpt blocks.
//
// What we expect: on our small synthetic task the three detectors land within a few mAP
// points of each other (one seed each, so differences of a point or two are noise), well
// below saturation and far above chance.
//
// Run: `make exp00` (trains the baselines on first use: about an hour on 2 cores; later runs
// reuse data/models/), `make exp00 QUICK=1` (tiny models, tiny data, ~1 minute; results go to
// results/quick/).
import ArgumentParser
import Foundation
import QuantLab

@main
struct Exp00: ParsableCommand {
    static func main() {
        lineBufferStandardOutput() // progress reaches log files as it happens
        main(nil)
    }

    static let configuration = CommandConfiguration(commandName: "exp00_fp32_baselines", abstract: "FP32 baselines: detectors and classifiers, RepVGG vs QARepVGG vs RepOpt.")

    @Flag(help: "Tiny models and data, results to results/quick/.") var quick = false
    @Option(help: "Where datasets live.") var dataRoot = "data"
    @Option(help: "Where trained baselines are cached.") var modelsRoot = "data/models"

    func run() throws {
        let start = Date()
        let plan = Baselines.Plan(quick: quick, dataRoot: URL(fileURLWithPath: dataRoot), modelsRoot: URL(fileURLWithPath: modelsRoot))

        // MARK: - 1 Data, 2 Model, 3 Train or load
        // Baselines.detector / .classifier generate the synthetic data (deterministic) and train
        // each model unless data/models holds one with exactly this configuration.
        var detectorRows: [[String]] = [], cocoRows: [[String]] = [], json: [String: Any] = [:]
        var maps: [BlockKind: Double] = [:]
        for block in Baselines.detectorBlocks {
            let (model, record, val) = try Baselines.detector(block, plan: plan)

            // MARK: - 5 Evaluate
            // COCO mAP@[.5:.95] and the other 11 numbers on the validation split, EMA weights,
            // letterboxed input; FLOPs of one forward pass (2 x MACs of conv/linear layers).
            let (result, _) = try evaluateDetector(model, on: val, progressLabel: "eval det-\(block.rawValue)")
            maps[block] = result.mAP
            // Params and FLOPs of the train-time form differ by block kind (RepOpt has no 1x1
            // branch); after fuse() every block is one 3x3 conv and the deploy forms are equal.
            let size = model.config.inputSize
            let trainParams = model.parameterCount
            model.fuseRepBlocks()
            let flops = FLOPCounter.count { _ = withNoGrad { model(Tensor(zeros: [1, 3, size, size])) } }
            detectorRows.append([block.rawValue, String(format: "%.3f", result.stats[0]), String(format: "%.3f", result.stats[1]),
                                 String(format: "%.2f M / %.2f M", Double(trainParams) / 1e6, Double(model.parameterCount) / 1e6), String(format: "%.2f", flops / 1e9),
                                 "\(record.epochs)" + (record.searchEpochs.map { " (+\($0) search)" } ?? ""),
                                 String(format: "%.1f min", record.wallSeconds / 60), String(format: "%.1f", record.imagesPerSecond)])
            cocoRows.append([block.rawValue] + result.stats.map { String(format: "%.3f", $0) })
            json["detector_\(block.rawValue)"] = ["coco_stats": result.stats, "params": model.parameterCount, "gflops": flops / 1e9,
                                                  "train_seconds": record.wallSeconds, "train_images_per_second": record.imagesPerSecond,
                                                  "epochs": record.epochs]
        }
        var classifierRows: [[String]] = []
        var top1s: [BlockKind: Double] = [:]
        for block in Baselines.classifierBlocks {
            let (model, record, val) = try Baselines.classifier(block, plan: plan)
            let accuracy = try top1(model, on: val)
            top1s[block] = accuracy
            classifierRows.append([block.rawValue, String(format: "%.2f%%", 100 * accuracy), String(format: "%.2f M", Double(model.parameterCount) / 1e6),
                                   "\(record.epochs)" + (record.searchEpochs.map { " (+\($0) search)" } ?? ""),
                                   String(format: "%.1f min", record.wallSeconds / 60), String(format: "%.1f", record.imagesPerSecond)])
            json["classifier_\(block.rawValue)"] = ["top1": accuracy, "params": model.parameterCount, "train_seconds": record.wallSeconds]
        }

        // MARK: - 6 Report
        // Verdict: "close" when RepOpt's FP32 mAP is within 2 mAP points (0.02) of RepVGG's, the
        // seed-to-seed spread one expects of single short runs on 500 validation images.
        // Below LearnedFloor (0.05 mAP, 50% top-1; the rule exp02 and exp02b apply too) a model
        // has not learned enough for the comparison to mean anything (e.g. the QUICK smoke run):
        // then the verdict says so instead of calling it a match.
        let gap = (maps[.repopt] ?? 0) - (maps[.repvgg] ?? 0)
        let close = abs(gap) <= 0.02
        let learned = min(maps[.repopt] ?? 0, maps[.repvgg] ?? 0) >= LearnedFloor.detectorMAP
        let verdict: Verdict = !learned
            ? Verdict(.inconclusive, String(format: "Inconclusive: the baselines have not learned enough to compare (mAP %.3f and %.3f, below %.2f)%@.", maps[.repvgg] ?? 0, maps[.repopt] ?? 0, LearnedFloor.detectorMAP, quick ? "; expected for the QUICK smoke run" : ""))
            : close
            ? Verdict(.reproduced, String(format: "Reproduced in direction: RepOpt's FP32 mAP is within %.1f points of RepVGG's (%.3f vs %.3f), as in the article (%@ vs %@).", abs(gap) * 100, maps[.repopt] ?? 0, maps[.repvgg] ?? 0, Paper.A3.yolov6sFP32.text, Paper.A3.yolov6sFP32.text))
            : Verdict(.notReproduced, String(format: "Not reproduced: RepOpt's FP32 mAP differs from RepVGG's by %.1f points (%.3f vs %.3f); the article has them equal (%@ vs %@). Later experiments must read quantization drops relative to each model's own FP32.", gap * 100, maps[.repopt] ?? 0, maps[.repvgg] ?? 0, Paper.A3.yolov6sFP32.text, Paper.A3.yolov6sFP32.text))
        let clsGap = (top1s[.repopt] ?? 0) - (top1s[.repvgg] ?? 0)
        // A classifier below 50% top-1 on 10 classes has not converged enough for quantization
        // drops to be read against it (exp02 calls its PTQ comparison inconclusive then).
        let clsLearned = min(top1s[.repvgg] ?? 0, top1s[.repopt] ?? 0) >= LearnedFloor.classifierTop1
        let clsVerdict = clsLearned
            ? String(format: "RepOpt − RepVGG top-1: %+.1f points (paper +0.05).", 100 * clsGap)
            : String(format: "Weak baselines: %.1f%% and %.1f%% top-1 (chance 10%%) — the classifiers have not converged on shapes-cls in %d epochs, so the classification rows of later experiments are not yet meaningful.", 100 * (top1s[.repvgg] ?? 0), 100 * (top1s[.repopt] ?? 0), plan.classifierEpochs)
        var md = """
        # exp00 — FP32 baselines

        **Claim (CLAIMS.md A3):** YOLOv6s trained with RepVGG blocks or with RepOpt reaches the same FP32 accuracy.
        **Scale:** our models are YOLOv6-N-proportioned detectors (\(quick ? "tiny variant, smoke run" : "width 0.25, depth 0.33, 160 px")) and a small RepVGG-style classifier, trained from scratch on the synthetic shapes datasets on a 2-core CPU — not YOLOv6s on COCO. Compare directions and gaps, not absolute numbers.

        ## Detector, paper vs ours

        \(markdownTable(["", "paper (YOLOv6s, COCO val, article)", "ours (synthetic shapes val)"], [
            ["RepVGG FP32 mAP", Paper.A3.yolov6sFP32.text, String(format: "%.3f", maps[.repvgg] ?? -1)],
            ["RepOpt FP32 mAP", Paper.A3.yolov6sFP32.text, String(format: "%.3f", maps[.repopt] ?? -1)],
            ["QARepVGG FP32 mAP", "— (not in the article)", String(format: "%.3f", maps[.qarepvgg] ?? -1)],
            ["RepOpt − RepVGG", String(format: "%.1f", Paper.A3.yolov6sFP32.value - Paper.A3.yolov6sFP32.value), String(format: "%+.3f", gap)],
        ]))
        **Verdict:** \(verdict.text)

        \(markdownTable(["block", "mAP@[.5:.95]", "mAP@.5", "params (train / deploy)", "GFLOPs (deploy, 1 image)", "epochs", "training time", "train img/s"], detectorRows))
        All 12 COCO numbers (pycocotools order: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl):

        \(markdownTable(["block"] + ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"], cocoRows))
        ## Classifier, paper vs ours

        \(markdownTable(["", "paper (RepOpt-VGG-B1 / RepVGG-B1, ImageNet)", "ours (synthetic shapes-cls val)"], [
            ["RepVGG FP32 top-1", "\(Paper.A1.repvggB1FP32.text)% (\(Paper.A1.repvggB1FP32.source.rawValue), A1)", String(format: "%.2f%%", 100 * (top1s[.repvgg] ?? 0))],
            ["RepOpt FP32 top-1", "\(Paper.A3.repoptB1FP32.text)% (\(Paper.A3.repoptB1FP32.source.rawValue))", String(format: "%.2f%%", 100 * (top1s[.repopt] ?? 0))],
            ["RepOpt − RepVGG", String(format: "%+.2f", Paper.A3.repoptB1FP32.value - Paper.A1.repvggB1FP32.value), String(format: "%+.2f", 100 * clsGap)],
        ]))
        **Verdict:** \(clsVerdict)

        \(markdownTable(["block", "top-1", "params", "epochs", "training time", "train img/s"], classifierRows))
        """
        var provenance = Provenance.current()
        provenance.seeds = ["init, data order and augmentation": plan.seed, "RepOpt hyper-search": plan.seed &+ 1, "dataset": plan.detectionPreset.seed]
        provenance.config = ["quick": String(quick), "detector epochs": String(plan.detectorEpochs), "detector search epochs": String(plan.detectorSearchEpochs),
                             "classifier epochs": String(plan.classifierEpochs), "dataset": plan.detectionPreset.name]
        provenance.wallSeconds = Date().timeIntervalSince(start)
        md += "\n" + provenance.markdown + "\n"
        json["verdict"] = verdict.text
        // The claim as exp08 and the README index show it (the FP32 half of A3).
        let claim = ClaimResult("A3", paper: "FP32 \(Paper.A3.yolov6sFP32.text) vs \(Paper.A3.yolov6sFP32.text) mAP (YOLOv6s, COCO)",
                                ours: String(format: "FP32 %.3f (RepVGG) vs %.3f (RepOpt) mAP; QARepVGG %.3f", maps[.repvgg] ?? 0, maps[.repopt] ?? 0, maps[.qarepvgg] ?? 0),
                                verdict: verdict)
        json["claims"] = try jsonObject([claim])
        json["classifier_verdict"] = clsVerdict
        json["provenance"] = ["git": provenance.gitDescribe, "date": provenance.date, "wall_seconds": provenance.wallSeconds]
        let path = try writeResults(name: "exp00", quick: quick, markdown: md, json: json)
        print("\n\(verdict.text)\nwrote \(path.path)")
    }
}
