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

    /// The project's Python (`ProjectPython`) and scripts/opencv_preprocess.py, or nil.
    public static func locate() -> OpenCVPeer? {
        ProjectPython.script("opencv_preprocess.py").map { OpenCVPeer(python: ProjectPython().python, script: $0) }
    }

    /// Whether the Python can import cv2 and numpy.
    public var isAvailable: Bool { ProjectPython(python).canImport("cv2, numpy") }

    /// Preprocesses `images` images of `folder` (cycled) to `size` with `threads` threads.
    public func run(folder: URL, size: Int, images: Int, threads: Int) throws -> Result {
        let (data, message, status) = try ProjectPython(python).run([script, folder.path, String(size), String(images), String(threads)])
        guard status == 0 else { throw PeerError("opencv_preprocess.py failed (\(status)): \(message.suffix(500))") }
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
