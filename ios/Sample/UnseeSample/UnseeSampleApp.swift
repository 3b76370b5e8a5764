import SwiftUI

@main
struct UnseeSampleApp: App {
    var body: some Scene {
        WindowGroup { ContentView() }
    }
}
