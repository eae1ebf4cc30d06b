// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "vdinbd",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "vdinbd", targets: ["vdinbd"]),
        .executable(name: "vdictl", targets: ["vdictl"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.0.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.80.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.1.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.0.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.27.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.5.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.0.0"),
    ],
    targets: [
        // The locks (the standard library's, or pthread ones ThreadSanitizer sees through).
        .target(name: "Locking"),
        // The storage seam: what Storage and Server know of a disk image (pure: no I/O).
        .target(name: "Image", dependencies: ["Locking", .product(name: "SystemPackage", package: "swift-system")]),
        .target(
            name: "VHD",
            dependencies: [
                "Image", "Locking",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        // Raw sparse files: the second implementation of the seam.
        .target(
            name: "RawImage",
            dependencies: ["Image", "Locking", .product(name: "SystemPackage", package: "swift-system")]
        ),
        // qcow2 (version 3, backing chains, compressed clusters read): the third.
        .systemLibrary(name: "CZlib", providers: [.apt(["zlib1g-dev"])]),
        .target(
            name: "QCOW2",
            dependencies: ["Image", "Locking", "CZlib", .product(name: "SystemPackage", package: "swift-system")]
        ),
        .systemLibrary(
            name: "CGnuTLS",
            pkgConfig: "gnutls",
            providers: [.apt(["libgnutls28-dev"])]
        ),
        .target(name: "TLS", dependencies: ["CGnuTLS"]),
        .target(name: "CBT", dependencies: ["Locking", .product(name: "SystemPackage", package: "swift-system")]),
        .target(name: "NBD", dependencies: [.product(name: "NIOCore", package: "swift-nio")]),
        .target(
            name: "Storage",
            dependencies: [
                "Image", "VHD", "RawImage", "QCOW2", "CBT", "CGnuTLS", "Locking",
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "Server",
            dependencies: [
                "NBD", "Storage", "TLS", "Locking",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "Control",
            dependencies: [
                "Storage", "Locking",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Export and import over HTTP (seed 000's handlers), on its own listener.
        .target(
            name: "HTTP",
            dependencies: [
                "Storage", "Locking",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "vdinbd",
            dependencies: [
                "Server", "Control", "Storage", "TLS", "HTTP",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "vdictl",
            dependencies: [
                "Control", "VHD", "CBT",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .testTarget(name: "VHDTests", dependencies: ["VHD", "CBT", "Image"]),
        .testTarget(name: "RawImageTests", dependencies: ["RawImage", "Image"]),
        .testTarget(name: "QCOW2Tests", dependencies: ["QCOW2", "Image", "Locking"]),
        .testTarget(name: "TLSTests", dependencies: ["TLS"]),
        .testTarget(name: "CBTTests", dependencies: ["CBT", "Locking"]),
        .testTarget(
            name: "NBDTests",
            dependencies: ["NBD", .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOTestUtils", package: "swift-nio")]
        ),
        .testTarget(name: "StorageTests", dependencies: ["Storage", "VHD", "Locking", .product(name: "GRDB", package: "GRDB.swift")]),
        .testTarget(name: "ControlTests", dependencies: ["Control", "Storage"]),
        .testTarget(name: "ServerTests", dependencies: ["Server", "Control"]),
    ],
    swiftLanguageModes: [.v6]
)

// libFuzzer targets (`Tools/fuzz`): built only with VDINBD_FUZZ=1 set, with
// `-sanitize=fuzzer,address` (libFuzzer supplies `main`), so a plain build never sees them.
if Context.environment["VDINBD_FUZZ"] != nil {
    for (name, deps) in [("fuzz-vhd", ["VHD"]), ("fuzz-nbd-request", ["NBD"]), ("fuzz-nbd-handshake", ["NBD"]), ("fuzz-cbt", ["CBT"]), ("fuzz-vhd-stream", ["VHD", "Image"]), ("fuzz-qcow2", ["QCOW2", "Image"]), ("fuzz-control", ["Control", "Storage"])] {
        package.targets.append(.executableTarget(
            name: name,
            dependencies: deps.map { .target(name: $0) } + [.product(name: "NIOCore", package: "swift-nio")]
                + (name == "fuzz-control" ? [.product(name: "Logging", package: "swift-log")] : []),
            path: "Tools/fuzz/\(name)",
            swiftSettings: [.unsafeFlags(["-parse-as-library"])]))
    }
}
