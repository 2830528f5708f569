// The papers' numbers, in one place. Every number an experiment prints as "paper" comes from
// here, and every one is in its claim's row of CLAIMS.md (a test checks that), with its source.
// No experiment types a paper number.

/// Where a reported number comes from; the names CLAIMS.md uses.
public enum PaperSource: String, Sendable {
    case article
    case yolov6README = "YOLOv6 README"
    case yolov6Tutorial = "YOLOv6 tutorial"
    case repOptPaper = "RepOpt paper"
    case qaRepVGGPaper = "QARepVGG paper"
    case paddleSlimREADME = "PaddleSlim README"
}

/// One number a source reports for a claim of CLAIMS.md.
public struct PaperNumber: Sendable, CustomStringConvertible {
    /// The claim's ID in CLAIMS.md ("A3").
    public let claim: String
    /// As the source prints it ("42.4", "[0, 57]"); CLAIMS.md has this text in the claim's row.
    public let text: String
    /// The value to compute with (for a range, its upper end).
    public let value: Double
    public let source: PaperSource
    /// What was measured, for a reader of the code.
    public let what: String

    init(_ claim: String, _ text: String, value: Double? = nil, _ source: PaperSource, _ what: String) {
        self.claim = claim
        self.text = text
        self.value = value ?? Double(text)!
        self.source = source
        self.what = what
    }

    /// "42.4 (article)".
    public var description: String { "\(text) (\(source.rawValue))" }

    /// "35.0 (article; YOLOv6 README 35.6)": a number with the other sources' values for it.
    public func with(_ others: PaperNumber...) -> String {
        ([description.dropLast()] + others.map { "\($0.source.rawValue) \($0.text)" }).joined(separator: "; ") + ")"
    }
}

/// The papers' numbers by claim (CLAIMS.md). Units: COCO mAP@[.5:.95] in points, ImageNet
/// top-1 in percent, as the sources print them.
public enum Paper {
    public enum A1 {
        public static let repvggB1FP32 = PaperNumber("A1", "78.42", .article, "RepVGG-B1 ImageNet top-1 (%), FP32")
        public static let repvggB1PTQ = PaperNumber("A1", "54.55", .article, "RepVGG-B1 ImageNet top-1 (%), TensorRT INT8 PTQ")
    }

    public enum A2 {
        public static let activationRangeRepVGG = PaperNumber("A2", "[0, 57]", value: 57, .article, "YOLOv6s RepVGG, input range of Rep_p4.block.0.rbr_reparam")
        public static let activationRangeRepOpt = PaperNumber("A2", "[0, 10]", value: 10, .article, "YOLOv6s RepOpt, input range of Rep_p4.block.0.rbr_reparam")
        /// The layer the article's Fig. 2 shows.
        public static let layer = "neck.Rep_p4.block.0.rbr_reparam"
    }

    public enum A3 {
        public static let yolov6sFP32 = PaperNumber("A3", "42.4", .article, "YOLOv6s COCO mAP, FP32, RepVGG or RepOpt")
        public static let repvggPTQ = PaperNumber("A3", "35.0", .article, "YOLOv6s RepVGG COCO mAP, INT8 PTQ")
        public static let repvggPTQReadme = PaperNumber("A3", "35.6", .yolov6README, "YOLOv6s RepVGG COCO mAP, INT8 PTQ")
        public static let repoptPTQ = PaperNumber("A3", "40.9", .article, "YOLOv6s RepOpt COCO mAP, INT8 PTQ")
        public static let repoptPTQTutorial = PaperNumber("A3", "40.5", .yolov6Tutorial, "YOLOv6s RepOpt COCO mAP, INT8 PTQ")
        public static let repoptB1FP32 = PaperNumber("A3", "78.47", .repOptPaper, "RepOpt-VGG-B1 ImageNet top-1 (%), FP32")
        public static let repoptB1PTQ = PaperNumber("A3", "75.89", .repOptPaper, "RepOpt-VGG-B1 ImageNet top-1 (%), INT8 PTQ")
    }

    public enum A4 {
        public static let fp32 = A3.yolov6sFP32
        public static let fullPTQ = A3.repoptPTQ
        public static let partialPTQ = PaperNumber("A4", "42.0", .article, "YOLOv6s RepOpt COCO mAP, top 6 sensitive layers in FP32")
        public static let partialPTQReadme = PaperNumber("A4", "42.1", .yolov6README, "YOLOv6s RepOpt COCO mAP, partial PTQ")
        public static let skippedLayers = PaperNumber("A4", "6", .article, "layers left in FP32")
        public static let calibrationBatches = PaperNumber("A4", "4", .article, "calibration batches")
        public static let batchSize = PaperNumber("A4", "32", .article, "batch size of calibration and sensitivity")
    }

    public enum A5 {
        public static let cwdGain = PaperNumber("A5", "0.3", .article, "COCO mAP that CWD adds to partial QAT (YOLOv6s RepOpt)")
        /// The stack's last two steps (A11, the article's lost Table 10, read as partial QAT then + CWD).
        public static let partialQAT = PaperNumber("A11", "42.1", .article, "YOLOv6s RepOpt COCO mAP, partial QAT (about)")
        public static let partialQATCWD = PaperNumber("A11", "42.3", .article, "YOLOv6s RepOpt COCO mAP, partial QAT + CWD (about)")
    }

    public enum A6 {
        public static let reformatShare = PaperNumber("A6", "10.8", .article, "share of the QAT engine's TensorRT kernels that were requantize/reformat kernels (%)")
    }

    public enum A7 {
        public static let upsampleScale = PaperNumber("A7", "0.083", .article, "scale of the input quantizer of neck.upsample1.upsample_transpose")
        public static let concatScale = PaperNumber("A7", "0.105", .article, "scale of the input quantizer of neck.Rep_n3.conv1, which reads the same tensor through a concat")
        /// The producer of the article's example and its two readers, in our module names.
        public static let producer = "neck.reduce_layer1.conv"
        public static let readers = ["neck.upsample1.upsample_transpose.input", "neck.Rep_n3.conv1.rbr_reparam.input"]
    }

    public enum A8 {
        public static let fusedQATqps = PaperNumber("A8", "528", .article, "T4 QPS of the QAT engine after scale fusion")
        public static let ptqQPS = PaperNumber("A8", "556", .article, "T4 QPS of the PTQ engine")
        public static let fusedQATmAP = PaperNumber("A8", "42.1", .article, "COCO mAP of the QAT model, kept after scale fusion")
    }

    /// Serving: once INT8 is fast, CPU preprocessing limits throughput (T4 + 16-core CPU).
    public enum A9 {
        public static let int8QPS = PaperNumber("A9", "552", .article, "T4 QPS of the INT8 engine with CPU preprocessing, several instances")
        public static let int8OverFP16 = PaperNumber("A9", "40", .article, "INT8 QPS above FP16 (%)")
        public static let cpuBusy = PaperNumber("A9", "1500", .article, "CPU utilisation with CPU preprocessing (%, 16 cores; 'above 1500%')")
    }

    /// DALI: decode and preprocess on the GPU.
    public enum A10 {
        public static let daliQPS = PaperNumber("A10", "1182", .article, "img/s of INT8 + DALI")
        public static let daliSpeedup = PaperNumber("A10", "2.14", .article, "INT8 + DALI over INT8 with CPU preprocessing (1182 / 552)")
        public static let cpuBusy = PaperNumber("A10", "1100", .article, "CPU utilisation with DALI (%, 'about')")
    }

    /// RT-DETR ACT: the training configuration (PaddleDetection's config, via the article).
    public enum B2 {
        public static let iterations = PaperNumber("B2", "1000", .article, "ACT training iterations")
        public static let learningRate = PaperNumber("B2", "3e-5", .article, "ACT learning rate (cosine from; the article's text says 1e-5)")
        public static let weightDecay = PaperNumber("B2", "4e-5", .article, "ACT weight decay (SGD)")
    }

    /// RT-DETR in INT8: mAP, size, latency (R50 rows of the PaddleSlim README; 4x and 44% from the article).
    public enum B3 {
        public static let r50Base = PaperNumber("B3", "53.1", .paddleSlimREADME, "RT-DETR-R50 COCO val mAP, FP32")
        public static let r50PTQ = PaperNumber("B3", "52.9", .paddleSlimREADME, "RT-DETR-R50 COCO val mAP, PTQ (conv only)")
        public static let r50ACT = PaperNumber("B3", "53.0", .paddleSlimREADME, "RT-DETR-R50 COCO val mAP, ACT (conv + matmul)")
        public static let r50LatencyFP32 = PaperNumber("B3", "32.05", .paddleSlimREADME, "RT-DETR-R50 latency ms, batch 1, T4, FP32")
        public static let r50LatencyFP16 = PaperNumber("B3", "9.12", .paddleSlimREADME, "RT-DETR-R50 latency ms, batch 1, T4, FP16")
        public static let r50LatencyINT8 = PaperNumber("B3", "6.96", .paddleSlimREADME, "RT-DETR-R50 latency ms, batch 1, T4, INT8")
        public static let sizeRatio = PaperNumber("B3", "4", .article, "model size FP32 / INT8")
        public static let speedup = PaperNumber("B3", "44", .article, "GPU speed-up of INT8 (%, 'up to')")
    }

    /// Relative drop (FP32 − INT8) / FP32.
    public static func relativeDrop(_ fp32: PaperNumber, _ int8: PaperNumber) -> Double { (fp32.value - int8.value) / fp32.value }

    /// Share of the PTQ loss that partial PTQ recovers: (partial − full) / (FP32 − full).
    public static func recovered(fp32: PaperNumber, full: PaperNumber, partial: PaperNumber) -> Double {
        (partial.value - full.value) / (fp32.value - full.value)
    }

    /// Every number above, for the consistency test against CLAIMS.md.
    public static let all: [PaperNumber] = [
        A1.repvggB1FP32, A1.repvggB1PTQ, A2.activationRangeRepVGG, A2.activationRangeRepOpt,
        A3.yolov6sFP32, A3.repvggPTQ, A3.repvggPTQReadme, A3.repoptPTQ, A3.repoptPTQTutorial, A3.repoptB1FP32, A3.repoptB1PTQ,
        A4.partialPTQ, A4.partialPTQReadme, A4.skippedLayers, A4.calibrationBatches, A4.batchSize,
        A5.cwdGain, A5.partialQAT, A5.partialQATCWD, A6.reformatShare, A7.upsampleScale, A7.concatScale, A8.fusedQATqps, A8.ptqQPS, A8.fusedQATmAP,
        A9.int8QPS, A9.int8OverFP16, A9.cpuBusy, A10.daliQPS, A10.daliSpeedup, A10.cpuBusy,
        B2.iterations, B2.learningRate, B2.weightDecay, B3.r50Base, B3.r50PTQ, B3.r50ACT, B3.r50LatencyFP32, B3.r50LatencyFP16,
        B3.r50LatencyINT8, B3.sizeRatio, B3.speedup,
    ]
}
