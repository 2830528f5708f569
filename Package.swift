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
    "exp03_sensitivity_partial_ptq",
]

let experimentTargets: [Target] = experimentNames.map { name in
    .executableTarget(
        name: name,
        dependencies: ["QuantLab", .product(name: "ArgumentParser", package: "swift-argument-parser")],
        path: "experiments/\(name)"
    )
}

let package = Package(
    name: "QuantLab",
    products: [
        .library(name: "QuantLab", targets: ["QuantLab"]),
        .executable(name: "qlab", targets: ["qlab"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
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
            exclude: ["gemm.cu", "conv_quant.cu", "elementwise.cu", "preprocess.cu", "runtime.cu", "common.cuh", "probe.c"],
            sources: ["swift_module.c"],
            publicHeadersPath: "include"
        ),
        .target(
            name: "QuantLab",
            dependencies: ["CKernels", "CImageIO", "CQLCuda"],
            linkerSettings: [.linkedLibrary("dl")]
        ),
        .executableTarget(
            name: "qlab",
            dependencies: ["QuantLab", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(
            name: "QuantLabTests",
            dependencies: ["QuantLab", "CKernels"]
        ),
    ] + experimentTargets
)
