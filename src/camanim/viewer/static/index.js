// The TensorBoard "CAManim" tab: TensorBoard loads this module in an iframe
// whose base URL is the plugin's route prefix, and calls render().
import "./viewer.js";

export async function render() {
  const css = document.createElement("link");
  css.rel = "stylesheet";
  css.href = "./viewer.css";
  document.head.appendChild(css);
  const root = document.createElement("div");
  document.body.appendChild(root);
  globalThis.CAManimViewer.start(root, globalThis.CAManimViewer.httpSource("./"),
                                 { pollMs: globalThis.CAMANIM_POLL_MS });
}
