// Bundles the web app (www/) with the wasm bindings (pkg/, built by scripts/build-wasm.sh) and
// matrix-js-sdk into dist/, which `hyphae-node --web dist` serves.
import path from "node:path";
import { fileURLToPath } from "node:url";
import CopyPlugin from "copy-webpack-plugin";

const here = path.dirname(fileURLToPath(import.meta.url));

export default (_env, argv) => ({
  mode: argv.mode ?? "production",
  entry: "./www/app.js",
  output: {
    path: path.join(here, "dist"),
    filename: "app.js",
    // matrix-js-sdk's end-to-end encryption (its own wasm module) is a chunk of its own, loaded
    // when the chat starts rather than with the page.
    chunkFilename: "[name].[contenthash:8].js",
    // The wasm module, emitted from pkg/hyphae.js's `new URL("hyphae_bg.wasm", import.meta.url)`.
    assetModuleFilename: "[name].[contenthash:8][ext]",
    clean: true,
  },
  devtool: false,
  performance: { hints: false },
  plugins: [
    new CopyPlugin({
      patterns: [{ from: "www/static", to: "." }],
    }),
  ],
});
