import Foundation
import QuantLabCore

/// OpenCV's `imdecode + resize + copyMakeBorder + normalise` (what a Python YOLOv6 server does)
/// on the same files and threads as our preprocessing: runs scripts/opencv_preprocess.py in the
/// project's Python (`make venv` installs opencv-python-headless). Used by `qlab serve-bench`
/// and exp06.
public struct OpenCVPeer: Sendable {
    public struct Result: Codable, Sendable {
        public var images: Int
        public var failed: Int
        public var seconds: Double
        public var img_per_s: Double
        public var cpu_seconds: Double
        public var opencv: String
    }

    public var python: String
    public var script: String

    /// The project's `.venv` Python (else python3) and scripts/opencv_preprocess.py, or nil.
    public static func locate() -> OpenCVPeer? {
        let cwd = FileManager.default.currentDirectoryPath
        let script = cwd + "/scripts/opencv_preprocess.py"
        guard FileManager.default.fileExists(atPath: script) else { return nil }
        let venv = cwd + "/.venv/bin/python"
        return OpenCVPeer(python: FileManager.default.isExecutableFile(atPath: venv) ? venv : "python3", script: script)
    }

    private func process(_ arguments: [String]) -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python.hasPrefix("/") ? python : "/usr/bin/env")
        p.arguments = (python.hasPrefix("/") ? [] : [python]) + arguments
        return p
    }

    /// Whether the Python can import cv2 and numpy.
    public var isAvailable: Bool {
        let p = process(["-c", "import cv2, numpy"])
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        do { try p.run() } catch { return false }
        p.waitUntilExit()
        return p.terminationStatus == 0
    }

    /// Preprocesses `images` images of `folder` (cycled) to `size` with `threads` threads.
    public func run(folder: URL, size: Int, images: Int, threads: Int) throws -> Result {
        let p = process([script, folder.path, String(size), String(images), String(threads)])
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let message = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw PeerError("opencv_preprocess.py failed (\(p.terminationStatus)): \(message.suffix(500))") }
        guard let line = String(decoding: data, as: UTF8.self).split(separator: "\n").last,
              let result = try? JSONDecoder().decode(Result.self, from: Data(line.utf8)) else {
            throw PeerError("opencv_preprocess.py printed no result line")
        }
        return result
    }
}

public struct PeerError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
