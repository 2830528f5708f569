/// A tiny image-classification task for tests and the `qlab demo` smoke run: 1-channel
/// size x size images, each a noisy background with one of four patterns at a random
/// position: a horizontal bar, a vertical bar, a diagonal line, or a filled square.
/// Class-specific structure is local, so a small conv net learns it in a few hundred steps,
/// while a linear model on raw pixels does not (positions vary).
import QuantLabCore
import QuantLabData

public enum ToyShapes {
    public static let classNames = ["horizontal", "vertical", "diagonal", "square"]

    /// A batch: images [n, 1, size, size] and labels in 0..<4, fully determined by `rng`.
    public static func batch(_ n: Int, size: Int = 12, noise: Float = 0.3, rng: inout SeededGenerator) -> (Tensor, [Int]) {
        require(size >= 8, "ToyShapes needs size >= 8")
        let images = Tensor(zeros: [n, 1, size, size])
        var labels: [Int] = []
        for i in 0..<n {
            let label = Int(rng.next() % 4)
            labels.append(label)
            let img = images.data + i * size * size
            for p in 0..<(size * size) { img[p] = noise * rng.nextGaussian() }
            let len = size / 2
            let r = Int(rng.next() % UInt64(size - len)), c = Int(rng.next() % UInt64(size - len))
            for t in 0..<len {
                switch label {
                case 0: img[r * size + c + t] += 1
                case 1: img[(r + t) * size + c] += 1
                case 2: img[(r + t) * size + c + t] += 1
                default: if t < 3 { for u in 0..<3 { img[(r + t) * size + c + u] += 1 } }
                }
            }
        }
        return (images, labels)
    }

    /// The small conv net used by the test and the demo: conv-BN-ReLU-pool, conv-BN-ReLU,
    /// global pooling, linear.
    public static func model(rng: inout SeededGenerator) -> Sequential {
        Sequential([
            Conv2d(1, 8, kernel: 3, bias: false, rng: &rng), BatchNorm2d(8), Lambda.relu(), Lambda.maxPool(2),
            Conv2d(8, 16, kernel: 3, bias: false, rng: &rng), BatchNorm2d(16), Lambda.relu(),
            Lambda.globalAvgPool(), Linear(16, 4, rng: &rng),
        ])
    }

    public struct TrainingReport: Sendable {
        public var firstLoss: Float, lastLoss: Float, accuracy: Float, steps: Int
    }

    /// Trains `model` with SGD + momentum and a warm-up/cosine schedule, then measures
    /// accuracy on `evalCount` fresh images (a different stream of the same generator).
    public static func train(_ model: Sequential, steps: Int, batchSize: Int = 32, evalCount: Int = 512,
                             rng: inout SeededGenerator, progress: ((Int, Float) -> Void)? = nil) -> TrainingReport {
        let optimizer = SGD(model.parameterGroups(weightDecay: 5e-4), learningRate: 0.1, momentum: 0.9, nesterov: true)
        let schedule = WarmupCosineSchedule(base: 0.1, warmupSteps: steps / 10, totalSteps: steps)
        var first: Float = .nan, recent: [Float] = []
        model.train()
        for step in 0..<steps {
            let (x, y) = batch(batchSize, rng: &rng)
            optimizer.learningRate = schedule.learningRate(at: step)
            let loss = crossEntropy(logits: model(x), targets: y)
            optimizer.zeroGrad()
            loss.backward()
            optimizer.step()
            let l = loss.item()
            if step == 0 { first = l }
            recent.append(l)
            if recent.count > 10 { recent.removeFirst() }
            progress?(step, l)
        }
        model.eval()
        var evalRng = rng.split()
        let (x, y) = batch(evalCount, rng: &evalRng)
        let logits = withNoGrad { model(x) }
        var correct = 0
        for i in 0..<evalCount {
            let row = Array(UnsafeBufferPointer(start: logits.data + i * 4, count: 4))
            if row.indices.max(by: { row[$0] < row[$1] }) == y[i] { correct += 1 }
        }
        return TrainingReport(firstLoss: first, lastLoss: recent.reduce(0, +) / Float(max(recent.count, 1)),
                              accuracy: Float(correct) / Float(evalCount), steps: steps)
    }
}
