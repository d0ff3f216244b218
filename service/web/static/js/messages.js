// The alert box above each page, and what each API error means in plain words (the
// server's own message adds the detail).

import { $ } from "./dom.js";

export function plainWords(error) {
  const detail = error.message ? ` (${error.message})` : "";
  switch (error.code) {
    case "not_an_image":
    case "corrupt_image":
    case "invalid_image":
      return "That file is not an image Lookalike can read. Use a JPEG, PNG, WebP, GIF, BMP or TIFF photo" + detail + ".";
    case "empty_file":
      return "That file is empty. Choose a photo with something in it.";
    case "image_too_large":
    case "payload_too_large":
      return "That file is too large to upload" + detail + ".";
    case "invalid_filter":
      return "The filter was not accepted: " + error.message + ". Fix it or clear the filters.";
    case "bad_filter_json":
      return "The filter is not valid JSON: " + error.message + ".";
    case "invalid_metadata":
      return "The metadata was not accepted: " + error.message + ".";
    case "unknown_model":
      return "No images have been processed with that model yet. Pick another model" + detail + ".";
    case "not_ready":
      return "This image is still being processed. Try again in a few seconds.";
    case "not_found":
      return "That image no longer exists.";
    case "network":
      return "Could not reach the server. Check the connection and try again.";
    default:
      if (error.status >= 500) {
        return "Something went wrong on the server (status " + error.status + "). Try again in a moment.";
      }
      return error.message || "That did not work (status " + error.status + ").";
  }
}

export function showMessage(text, kind = "error") {
  const box = $("#message");
  if (!box) return;
  box.textContent = text;
  box.className = "message " + kind;
  box.hidden = false;
}

export function clearMessage() {
  const box = $("#message");
  if (box) {
    box.hidden = true;
    box.textContent = "";
  }
}
