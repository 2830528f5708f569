// The umbrella module: `import QuantLab` gives the whole library. Inside the library each
// layer imports only the layers below it (Package.swift, ARCHITECTURE.md).
@_exported import QuantLabCore
@_exported import QuantLabData
@_exported import QuantLabModels
@_exported import QuantLabQuant
@_exported import QuantLabEngine
@_exported import QuantLabReport
@_exported import QuantLabBench
