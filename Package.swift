// swift-tools-version: 6.0
// QuantLab: INT8 quantization of object detectors, reproduced from scratch.
// Layout and conventions: see README.md and DESIGN notes in the repository.
import PackageDescription

// The C kernels are the only place for hot loops. SwiftPM compiles C at -O0 in debug
// builds, which makes kernels ~60x slower and `swift test` unbearably slow, so -O3 is
// forced for both configurations. No -march=native: SIMD variants are selected at run
// time through per-function target attributes.
let kernelFlags: [CSetting] = [
    .unsafeFlags(["-O3", "-std=c11", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unused-parameter"]),
]

// One executable per experiment, sources in experiments/<name>/main.swift. Listed by hand:
// SwiftPM caches the evaluated manifest by its text, so a manifest that scanned the folder
// would miss new experiments. `.ci/run` checks that this list matches experiments/.
let experimentNames = [
    "exp00_fp32_baselines",
    "exp01_weight_activation_distributions",
    "exp02_repvgg_vs_repopt_ptq",
    "exp02b_collapse_study",
    "exp03_sensitivity_partial_ptq",
    "exp04_partial_qat_cwd",
    "exp05_qdq_scale_fusion",
    "exp06_serving_preprocessing",
    "exp07_rtdetr_act",
    "exp08_summary",
]

let experimentTargets: [Target] = experimentNames.map { name in
    .executableTarget(
        name: name,
        dependencies: ["QuantLab", .product(name: "ArgumentParser", package: "swift-argument-parser")],
        path: "experiments/\(name)"
    )
}

// The library is a stack of targets, each depending only on the ones below it, so that a
// reach sideways or upwards is a compile error (`make build` passes
// --explicit-target-dependency-import-check error, which also rejects an import of a module
// the target does not list, e.g. CKernels from model code). ARCHITECTURE.md draws the stack.
//
//   QuantLabCore    tensors, autograd, layers, optimizers, safetensors, devices, Kernels
//   QuantLabData    COCO datasets, synthetic shapes, JPEG, transforms, boxes, NMS, COCO eval
//   QuantLabModels  Rep blocks, YOLOv6-style detector, classifier, training, saved models
//   QuantLabQuant   fake quantization, calibrators, the Q/DQ simulator, PTQ, sensitivity
//   QuantLabEngine  the INT8 engine: a graph of deploy-time ops traced from a model, executors
//   QuantLabReport  the papers' numbers, Markdown / SVG / JSON rendering, provenance
//   QuantLabBench   benchmarks (ratios against peers measured in one run)
//   QuantLab        the umbrella users import: re-exports all of the above
//
// Only the targets that own a kernel family call C: Core (tensor ops, optimizers, devices),
// Data (image kernels), Quant (fake quantization, histograms), Engine (integer kernels) and
// Bench (it times kernels).
let package = Package(
    name: "QuantLab",
    products: [
        .library(name: "QuantLab", targets: ["QuantLab"]),
        .executable(name: "qlab", targets: ["qlab"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        // Runtime library only: the ONNX types are generated once (scripts/gen_onnx_proto.sh) and committed.
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
    ],
    targets: [
        .target(
            name: "CKernels",
            cSettings: kernelFlags,
            linkerSettings: [.linkedLibrary("pthread"), .linkedLibrary("m")]
        ),
        // libjpeg-turbo wrappers (setjmp error handling lives in C: Swift cannot longjmp).
        .target(
            name: "CImageIO",
            cSettings: [.unsafeFlags(["-O2", "-std=c11", "-Wall"])],
            linkerSettings: [.linkedLibrary("jpeg")]
        ),
        // The CUDA plugin's C ABI (header only): the plugin is opened at run time with dlopen,
        // so the Swift build never needs CUDA. `make cuda` builds the plugin itself.
        .target(
            name: "CQLCuda",
            path: "cuda",
            exclude: ["sgemm.cu", "igemm.cu", "cublas_peer.cu", "conv_quant.cu", "elementwise.cu", "preprocess.cu", "runtime.cu", "common.cuh", "probe.c"],
            sources: ["swift_module.c"],
            publicHeadersPath: "include"
        ),
        .target(name: "QuantLabCore", dependencies: ["CKernels", "CQLCuda"], linkerSettings: [.linkedLibrary("dl")]),
        .target(name: "QuantLabData", dependencies: ["QuantLabCore", "CKernels", "CImageIO"]),
        .target(name: "QuantLabModels", dependencies: ["QuantLabCore", "QuantLabData"]),
        .target(name: "QuantLabQuant", dependencies: ["QuantLabCore", "QuantLabData", "QuantLabModels", "CKernels"]),
        .target(name: "QuantLabEngine", dependencies: ["QuantLabCore", "QuantLabData", "QuantLabModels", "QuantLabQuant", "CKernels", "CQLCuda",
                                                      .product(name: "SwiftProtobuf", package: "swift-protobuf")]),
        .target(name: "QuantLabReport", dependencies: ["QuantLabCore", "QuantLabData", "QuantLabModels", "QuantLabQuant", "QuantLabEngine"]),
        .target(name: "QuantLabBench", dependencies: ["QuantLabCore", "QuantLabData", "QuantLabModels", "QuantLabQuant", "QuantLabEngine", "CKernels", "CQLCuda"]),
        .target(name: "QuantLab", dependencies: ["QuantLabCore", "QuantLabData", "QuantLabModels", "QuantLabQuant", "QuantLabEngine", "QuantLabReport", "QuantLabBench"]),
        .executableTarget(
            name: "qlab",
            dependencies: ["QuantLab", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        // libFuzzer harness for the readers of outside input: `make fuzz` builds it with
        // -sanitize=fuzzer -DFUZZING in .build-fuzz (a plain build makes a stub).
        .executableTarget(name: "qlab-fuzz", dependencies: ["QuantLab"]),
        .testTarget(
            name: "QuantLabTests",
            dependencies: ["QuantLabCore", "QuantLabData", "QuantLabModels", "QuantLabQuant", "QuantLabEngine", "QuantLabReport", "QuantLabBench", "CKernels", "CQLCuda",
                           .product(name: "SwiftProtobuf", package: "swift-protobuf")]
        ),
    ] + experimentTargets
)
