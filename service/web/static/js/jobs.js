// The upload page's archive form and jobs list: each job is redrawn in place (progress,
// rate, time left, failures, cancel) until it is done, failed or cancelled.

import { ApiFailure, POLL_MS, api, pause } from "./api.js";
import { $, el } from "./dom.js";
import { clearMessage, plainWords, showMessage } from "./messages.js";

const FINISHED = new Set(["done", "failed", "cancelled"]);

function counts(job, settled) {
  const parts = [`${settled} of ${job.total}`];
  if (job.duplicates) parts.push(`${job.duplicates} already stored`);
  if (job.failed) parts.push(`${job.failed} failed`);
  if (!FINISHED.has(job.status) && job.rate) parts.push(`${job.rate.toFixed(1)} images/s`);
  if (!FINISHED.has(job.status) && job.eta_s !== null && job.eta_s !== undefined) {
    parts.push(`about ${Math.ceil(job.eta_s)} s left`);
  }
  return parts.join(" · ");
}

// The list of jobs, one row per job id, each row drawn from the job's latest state.
class JobList {
  constructor(list) {
    this.list = list;
    this.rows = new Map(); // job id -> its list item, redrawn in place while it runs
  }

  draw(job) {
    let row = this.rows.get(job.id);
    if (!row) {
      row = el("li", { class: "job", "data-id": job.id });
      this.rows.set(job.id, row);
      this.list.prepend(row);
    }
    const settled = job.done + job.failed + job.duplicates + job.cancelled;
    const label = `${job.source || "archive"} into “${job.collection}”`;
    const bar = el("progress", {
      max: Math.max(1, job.total), value: settled, "aria-label": `Progress of ${label}`,
    });
    const head = el("p", {}, el("strong", { text: label }), " ",
      el("span", { class: `badge badge-${job.status}`, text: job.status }));
    const children = [head, bar, el("p", { class: "job-counts", text: counts(job, settled) })];
    if (job.errors && job.errors.length) {
      children.push(el("ul", { class: "job-errors" },
        ...job.errors.map((e) => el("li", { text: `${e.name}: ${e.error || "failed"}` }))));
    }
    children.push(el("p", { class: "job-actions" }, this.action(job)));
    row.dataset.state = job.status;
    row.replaceChildren(...children);
    return row;
  }

  // Cancel while it runs; once finished, a link to browse what it stored.
  action(job) {
    if (FINISHED.has(job.status)) {
      return el("a", {
        href: `/browse?collection=${encodeURIComponent(job.collection)}`,
        text: `Browse “${job.collection}”`,
      });
    }
    const cancel = el("button", { type: "button", class: "secondary", text: "Cancel" });
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        this.draw(await api(`/jobs/${encodeURIComponent(job.id)}/cancel`, { method: "POST" }));
      } catch (error) {
        if (!(error instanceof ApiFailure)) throw error;
        showMessage(plainWords(error));
      }
    });
    return cancel;
  }

  async follow(id) {
    for (;;) {
      const job = await api(`/jobs/${encodeURIComponent(id)}`);
      this.draw(job);
      if (FINISHED.has(job.status)) return job;
      await pause(POLL_MS);
    }
  }

  followQuietly(id) {
    this.follow(id).catch((error) => {
      if (!(error instanceof ApiFailure)) throw error;
      showMessage("Lost track of a job: " + plainWords(error));
    });
  }
}

async function loadJobs(jobs, collection, status) {
  try {
    const query = new URLSearchParams({ limit: "10" });
    if (collection) query.set("collection", collection);
    const body = await api("/jobs?" + query.toString());
    body.items.slice().reverse().forEach((job) => jobs.draw(job));
    status.textContent = body.items.length ? "" : "No jobs yet.";
    status.hidden = body.items.length > 0;
    body.items.filter((job) => !FINISHED.has(job.status))
      .forEach((job) => jobs.followQuietly(job.id));
  } catch (error) {
    if (!(error instanceof ApiFailure)) throw error;
    status.textContent = "Jobs could not be loaded: " + plainWords(error);
  }
}

// The archive's upload as multipart form data, or null (and a message) if none is chosen.
function archiveData() {
  const file = $("#archive-file").files[0];
  if (!file) {
    showMessage("Choose an archive (.zip, .tar or .tar.gz) to upload.");
    $("#archive-file").focus();
    return null;
  }
  const data = new FormData();
  data.append("file", file, file.name);
  const metadata = $("#archive-metadata").files[0];
  if (metadata) data.append("metadata", metadata, metadata.name);
  data.append("collection", $("#archive-collection").value.trim() || "default");
  return { file, data };
}

// Wires the archive form and lists recent jobs; a page without the jobs API has no form.
export function jobsView() {
  const form = $("#archive-form");
  if (!form) return;
  const status = $("#jobs-status");
  const collection = $("#archive").dataset.collection;
  const jobs = new JobList($("#job-list"));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearMessage();
    const upload = archiveData();
    if (!upload) return;
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    status.hidden = false;
    status.textContent = `Uploading ${upload.file.name}…`;
    try {
      const created = await api("/jobs", { method: "POST", body: upload.data });
      status.hidden = true;
      jobs.followQuietly(created.id);
    } catch (error) {
      if (!(error instanceof ApiFailure)) throw error;
      status.textContent = "";
      showMessage(`${upload.file.name}: ${plainWords(error)}`);
    } finally {
      button.disabled = false;
    }
  });
  loadJobs(jobs, collection, status);
}
