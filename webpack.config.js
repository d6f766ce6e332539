// Bundles the web app (www/) with the wasm bindings (pkg/, built by scripts/build-wasm.sh) and
// matrix-js-sdk into dist/, which `hyphae-node --web dist` serves.
import path from "node:path";
import { fileURLToPath } from "node:url";
import CopyPlugin from "copy-webpack-plugin";
import webpack from "webpack";

const here = path.dirname(fileURLToPath(import.meta.url));

export default (_env, argv) => ({
  mode: argv.mode ?? "production",
  entry: "./www/app.js",
  output: {
    path: path.join(here, "dist"),
    filename: "app.js",
    // The wasm module, emitted from pkg/hyphae.js's `new URL("hyphae_bg.wasm", import.meta.url)`.
    assetModuleFilename: "[name].[contenthash:8][ext]",
    clean: true,
  },
  devtool: false,
  performance: { hints: false },
  plugins: [
    // matrix-js-sdk loads its end-to-end encryption module (5 MB of wasm) only when asked to;
    // the app does not ask, so it is left out of the build.
    new webpack.IgnorePlugin({ resourceRegExp: /^@matrix-org\/matrix-sdk-crypto-wasm$/ }),
    new CopyPlugin({
      patterns: [{ from: "www/static", to: "." }],
    }),
  ],
});
